//! A real S3 server for the object-storage tests: s3s-fs on 127.0.0.1,
//! which checks every request's signature, storing objects as files in a
//! directory the test can reach into (to damage an object, say).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "vsnap-test-key";
pub const SECRET_KEY: &str = "vsnap-test-secret-0123456789";
/// The bucket every server starts with.
pub const BUCKET: &str = "vsnap";

/// A running s3s-fs, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The server's root: a directory per bucket, a file per object.
    pub data: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where s3s-fs is: `$VSNAP_S3S_FS`, else on the PATH, else cargo's bin.
fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VSNAP_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(home_bin)
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}

impl S3Server {
    /// Starts a server, or records why `test` skips: without s3s-fs
    /// (scripts/test.sh installs it; under CI its absence fails the test).
    pub fn start(test: &str) -> Option<S3Server> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: s3s-fs is not installed, and CI must run the object-storage tests (scripts/test.sh installs it)"
            );
            crate::skip(
                test,
                "s3s-fs is not installed (cargo install s3s-fs@0.14.1 --features binary; scripts/test.sh does)",
                crate::Lack::Host,
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join(BUCKET)).unwrap();
        let port = crate::free_port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server {
            child,
            port,
            data,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points `cmd` at this server with the right credentials, and at
    /// nothing of the developer's own AWS setup.
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        env_for(cmd, &self.endpoint(), ACCESS_KEY, SECRET_KEY)
    }

    /// Where the server keeps a repository's object `key` under `prefix`
    /// in [`BUCKET`].
    pub fn object_file(&self, prefix: &str, key: &str) -> PathBuf {
        self.data.join(BUCKET).join(prefix).join(key)
    }

    /// The files of the objects under `prefix/dir` in [`BUCKET`].
    pub fn objects(&self, prefix: &str, dir: &str) -> Vec<PathBuf> {
        let d = self.data.join(BUCKET).join(prefix).join(dir);
        let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The AWS environment for an endpoint and keys, and nothing else of it.
pub fn env_for<'c>(
    cmd: &'c mut Command,
    endpoint: &str,
    key: &str,
    secret: &str,
) -> &'c mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("AWS_")) {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Restores snapshot `snap` (a backup's JSON report) and checks that the
/// restore's digests are the backup's.
/// `run` runs a vsnap command that must succeed and returns its stdout.
pub fn restores_to_its_digest(
    run: &dyn Fn(&[&str]) -> String,
    url: &str,
    snap: &serde_json::Value,
    dir: &std::path::Path,
) {
    let id = snap["snapshot"].as_str().unwrap();
    let out = dir.join(format!("r-{id}.vhd"));
    let o = run(&[
        "restore",
        "--json",
        "--repo",
        url,
        id,
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(
        o.contains(snap["disks"][0]["digest"].as_str().unwrap()),
        "{o}"
    );
    std::fs::remove_file(&out).unwrap();
}
