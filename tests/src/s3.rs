//! A real S3 server for the object-storage tests, on 127.0.0.1: s3s-fs,
//! which checks every request's signature, storing objects as files in a
//! directory the test can reach into (to damage an object, say); or, for
//! the bucket cases a second implementation must pass too, moto's server
//! (Python, in memory), which the test reaches through unsigned requests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "vsnap-test-key";
pub const SECRET_KEY: &str = "vsnap-test-secret-0123456789";
/// The bucket every server starts with.
pub const BUCKET: &str = "vsnap";

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    S3sFs,
    Moto,
}

/// The moto release the test command installs (scripts/test.sh).
pub const MOTO: &str = "5.2.1";

/// A running S3 server, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    pub kind: Impl,
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
        Self::start_impl(test, Impl::S3sFs)
    }

    /// [`S3Server::start`] of `kind`. moto needs `python3 -m moto.server`
    /// (scripts/test.sh installs moto[server]); it keeps objects in
    /// memory, so the test reaches them through [`S3Server::keys`],
    /// [`S3Server::read`], [`S3Server::write`] and [`S3Server::remove`].
    pub fn start_impl(test: &str, kind: Impl) -> Option<S3Server> {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join(BUCKET)).unwrap();
        let port = crate::free_port();
        let mut cmd = match kind {
            Impl::S3sFs => {
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
                let mut c = Command::new(bin);
                c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&data);
                c
            }
            Impl::Moto => {
                let there = Command::new("python3")
                    .args(["-c", "import moto.server"])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !there {
                    assert!(
                        std::env::var_os("CI").is_none(),
                        "{test}: moto's server is not installed, and CI must run the bucket cases against it (scripts/test.sh installs it)"
                    );
                    crate::skip(
                        test,
                        &format!("moto's server is not installed (pip install 'moto[server]=={MOTO}'; scripts/test.sh does)"),
                        crate::Lack::Host,
                    );
                    return None;
                }
                let mut c = Command::new("python3");
                c.args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ]);
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server {
            child,
            kind,
            port,
            data,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if kind == Impl::Moto {
            let (status, body) = server.raw("PUT", &format!("/{BUCKET}"), None);
            assert_eq!(status, 200, "create the bucket: {body}");
        }
        Some(server)
    }

    /// An unsigned request to moto, which checks no signature but treats
    /// a request without an Authorization header as anonymous (refused
    /// on a private bucket): the header names the test's key, signed by
    /// nothing.
    fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
        let (status, body) = self.raw_bytes(method, path, body);
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// [`S3Server::raw`], the answer's body as bytes.
    fn raw_bytes(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        assert_eq!(self.kind, Impl::Moto, "s3s-fs refuses unsigned requests");
        let addr = format!("127.0.0.1:{}", self.port);
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
        );
        let (status, _, body) =
            crate::http_bytes(&addr, method, path, &[("authorization", &auth)], body);
        (status, body)
    }

    /// The keys under `prefix/dir` of [`BUCKET`] (`dir` empty: all of
    /// `prefix`'s; s3s-fs: one level), relative to `prefix`, sorted.
    pub fn keys(&self, prefix: &str, dir: &str) -> Vec<String> {
        match self.kind {
            Impl::S3sFs => self
                .objects(prefix, dir)
                .iter()
                .filter_map(|p| {
                    let name = p.file_name()?.to_str()?;
                    Some(if dir.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{dir}/{name}")
                    })
                })
                .collect(),
            Impl::Moto => {
                let (status, xml) = self.raw(
                    "GET",
                    &format!("/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}/{dir}"),
                    None,
                );
                assert_eq!(status, 200, "{xml}");
                let mut out: Vec<String> = xml
                    .split("<Key>")
                    .skip(1)
                    .filter_map(|k| k.split("</Key>").next())
                    .filter_map(|k| Some(k.strip_prefix(&format!("{prefix}/"))?.to_owned()))
                    .collect();
                out.sort();
                out
            }
        }
    }

    /// Object `key` of `prefix`, whole; `None` where there is none.
    pub fn read(&self, prefix: &str, key: &str) -> Option<Vec<u8>> {
        match self.kind {
            Impl::S3sFs => std::fs::read(self.object_file(prefix, key)).ok(),
            Impl::Moto => {
                let (status, body) =
                    self.raw_bytes("GET", &format!("/{BUCKET}/{prefix}/{key}"), None);
                (status == 200).then_some(body)
            }
        }
    }

    /// Puts `bytes` as object `key` of `prefix`, over any there.
    pub fn write(&self, prefix: &str, key: &str, bytes: &[u8]) {
        match self.kind {
            Impl::S3sFs => {
                let f = self.object_file(prefix, key);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, bytes).unwrap();
            }
            Impl::Moto => {
                let (status, body) =
                    self.raw("PUT", &format!("/{BUCKET}/{prefix}/{key}"), Some(bytes));
                assert_eq!(status, 200, "{body}");
            }
        }
    }

    /// Deletes object `key` of `prefix`.
    pub fn remove(&self, prefix: &str, key: &str) {
        match self.kind {
            Impl::S3sFs => std::fs::remove_file(self.object_file(prefix, key)).unwrap(),
            Impl::Moto => {
                let (status, body) = self.raw("DELETE", &format!("/{BUCKET}/{prefix}/{key}"), None);
                assert_eq!(status, 204, "{body}");
            }
        }
    }

    /// `vsnap ARGS` against this server, with `envs` besides, under GNU
    /// time: its output and its peak RSS in KiB, both also said on the
    /// test's stderr (where a closing note's figures are read from).
    pub fn vsnap_measured(&self, args: &[&str], envs: &[(&str, &Path)]) -> (Output, u64) {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rss = self._dir.path().join(format!("rss-{n}"));
        let mut cmd = Command::new("/usr/bin/time");
        cmd.arg("-f").arg("%M").arg("-o").arg(&rss);
        cmd.env("VSNAP_CACHE_DIR", crate::test_cache());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let o = self
            .env(&mut cmd)
            .arg(crate::vsnap_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("/usr/bin/time (package time) runs vsnap");
        let kib = crate::peak_rss_kib(&rss);
        eprintln!(
            "vsnap {}: exit {:?}, peak RSS {kib} KiB\n  {}",
            args.first().unwrap_or(&""),
            o.status.code(),
            crate::stderr(&o).trim().replace('\n', "\n  ")
        );
        (o, kib)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points `cmd` at this server with the right credentials, and at
    /// nothing of the developer's own AWS setup.
    pub fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        env_for(cmd, &self.endpoint(), ACCESS_KEY, SECRET_KEY)
    }

    /// Where s3s-fs keeps a repository's object `key` under `prefix` in
    /// [`BUCKET`].
    pub fn object_file(&self, prefix: &str, key: &str) -> PathBuf {
        assert_eq!(self.kind, Impl::S3sFs, "moto keeps objects in memory");
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
    dir: &Path,
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
