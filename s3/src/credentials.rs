//! The shared credentials file of the AWS tools, for a host configured
//! with `aws configure` rather than the environment: object_store reads
//! only the environment.

use std::path::PathBuf;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// The profile `AWS_PROFILE` (default `default`) of
/// `AWS_SHARED_CREDENTIALS_FILE` (default `~/.aws/credentials`).
pub(crate) fn from_file() -> Option<Credentials> {
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))?;
    // A credentials file is a few hundred bytes; a huge one is not read.
    if std::fs::metadata(&path).ok()?.len() > 1 << 20 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    parse(&text, &profile)
}

/// A profile's keys from the file's INI text.
pub(crate) fn parse(text: &str, profile: &str) -> Option<Credentials> {
    let mut inside = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_profile_only() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n# note\n[site]\naws_access_key_id=C\naws_secret_access_key = D\naws_session_token = T\n";
        assert_eq!(
            parse(text, "default"),
            Some(Credentials {
                access_key_id: "A".into(),
                secret_access_key: "B".into(),
                session_token: None
            })
        );
        assert_eq!(
            parse(text, "site").and_then(|c| c.session_token),
            Some("T".into())
        );
        assert_eq!(parse(text, "other"), None);
        assert_eq!(parse("[default]\naws_access_key_id=A\n", "default"), None);
    }
}
