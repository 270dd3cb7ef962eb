//! The API's bearer token: 32 random bytes, hex, in `state_dir/api.token`,
//! made with mode 0600 at the first start. A token file others can read
//! is refused, not used.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{ErrorKind, Result};

pub const FILE: &str = "api.token";

fn io(e: std::io::Error, path: &Path, during: &str) -> crate::Error {
    crate::Error::from(ErrorKind::Io(e)).at(format!("{}: {during}", path.display()))
}

/// Reads the token, creating it first if there is none.
pub fn load_or_create(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir, "create the state directory"))?;
    let path = dir.join(FILE);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let bytes: [u8; 32] = random()?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| io(e, &path, "write the token"))?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(&path),
        Err(e) => Err(io(e, &path, "create the token")),
    }
}

/// `N` bytes from the kernel's random source.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| std::io::Read::read_exact(&mut r, &mut bytes))
        .map_err(|e| io(e, Path::new("/dev/urandom"), "read"))?;
    Ok(bytes)
}

/// Reads the token of a service that has started once; unlike
/// [`load_or_create`], never makes one (a client of the service must not).
pub fn load(dir: &Path) -> Result<String> {
    let path = dir.join(FILE);
    if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Err(crate::Error::from(ErrorKind::Config(
            "no API token: the service makes it at its first start (vsnap serve --config FILE)"
                .into(),
        ))
        .at(path.display().to_string()));
    }
    read(&path)
}

/// An existing token, refused if others can read it or it is too short.
fn read(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| io(e, path, "stat"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(crate::Error::from(ErrorKind::Config(format!(
            "the API token is readable by others (mode {mode:o}); chmod 600 it, or remove it for a new one"
        )))
        .at(path.display().to_string()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| io(e, path, "read the token"))?;
    let token = text.trim().to_string();
    if token.len() < 16 {
        return Err(crate::Error::from(ErrorKind::Config(
            "the API token is shorter than 16 characters; remove the file for a new one".into(),
        ))
        .at(path.display().to_string()));
    }
    Ok(token)
}

/// Constant-time, so the answer's timing says nothing about the token.
pub fn matches(token: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    token.len() == given.len() && bool::from(token.as_bytes().ct_eq(given.as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn made_once_private_and_refused_when_others_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let t = load_or_create(dir.path()).unwrap();
        assert_eq!(t.len(), 64);
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), t);
        assert!(matches(&t, &t) && !matches(&t, &t[1..]) && !matches(&t, ""));
        std::fs::set_permissions(
            dir.path().join(FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("readable by others (mode 644)"), "{e}");
    }
}
