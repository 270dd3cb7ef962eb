//! vsnap's repository in S3-compatible object storage (AWS S3, Ceph RGW,
//! MinIO, Garage): the [`ObjectStore`] the engine's bucket repository runs
//! on, over the `object_store` crate, and the one way the CLI and the
//! service open a repository by its address, a directory or
//! `s3://BUCKET/PREFIX`.
//!
//! Credentials and the endpoint come as for the AWS tools: the `AWS_*`
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an
//! S3-compatible server), else the shared credentials file's profile
//! (`AWS_PROFILE`, default `default`). `AWS_CA_BUNDLE` names a PEM
//! bundle of CAs to trust beyond the host's (an on-premises store with a
//! private CA), and `AWS_UNSIGNED_PAYLOAD=true` leaves bodies out of the
//! request signature over HTTPS, where TLS checks them in transit.

mod client;
mod credentials;
mod errors;
mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vsnap_repo::{Error, ErrorKind, Result};
use vsnap_repo::{ObjectStore, Repository};

pub use client::S3Store;

/// A repository's address: a local directory, or a bucket and prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// Reads an address: `s3://BUCKET[/PREFIX]`, else a directory. A
    /// bucket name is checked as S3 names them, and a prefix may not have
    /// empty, `.` or `..` parts, so no two spellings name one repository.
    pub fn parse(s: &Path) -> Result<Location> {
        let Some(rest) = s.to_str().and_then(|t| t.strip_prefix("s3://")) else {
            return Ok(Location::Dir(s.to_path_buf()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let bad = |why: String| {
            Err(Error::from(ErrorKind::InvalidArgument(format!(
                "{}: {why}; write s3://BUCKET/PREFIX",
                s.display()
            ))))
        };
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return bad(format!(
                "{bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' and '.')"
            ));
        }
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == ".." || p.chars().any(char::is_control))
        {
            return bad(format!(
                "the prefix {prefix:?} has an empty, '.' or '..' part"
            ));
        }
        Ok(Location::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

fn connect(bucket: &str, prefix: &str) -> Result<Arc<dyn ObjectStore>> {
    Ok(Arc::new(S3Store::connect(bucket, prefix)?))
}

/// Opens the repository at `location`, a directory or `s3://…`.
pub fn open(location: &Path) -> Result<Repository> {
    match Location::parse(location)? {
        Location::Dir(d) => Repository::open(&d),
        Location::S3 { bucket, prefix } => Repository::open_bucket(
            connect(&bucket, &prefix)?,
            vsnap_engine::pipeline::cache_dir().as_deref(),
        ),
    }
}

/// Makes a new repository at `location`; `pack_size` applies to object
/// storage only, where chunks go into packs, and so does
/// `accept_unconditional` (a server that ignores conditional writes is
/// refused without it; see [`Repository::init_bucket_with`]).
pub fn init(
    location: &Path,
    chunk_size: u64,
    pack_size: u64,
    accept_unconditional: bool,
    index_memory: Option<u64>,
) -> Result<Repository> {
    match Location::parse(location)? {
        Location::Dir(d) => Repository::init(&d, chunk_size),
        Location::S3 { bucket, prefix } => Repository::init_bucket_with(
            connect(&bucket, &prefix)?,
            chunk_size,
            pack_size,
            vsnap_engine::pipeline::cache_dir().as_deref(),
            accept_unconditional,
            index_memory,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_named() {
        let p = |s: &str| Location::parse(Path::new(s));
        assert_eq!(
            p("s3://backups/site-a/").unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "site-a".into()
            }
        );
        assert_eq!(
            p("s3://backups").unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: String::new()
            }
        );
        assert_eq!(p("/srv/repo").unwrap(), Location::Dir("/srv/repo".into()));
        let err = |s: &str| p(s).unwrap_err().to_string();
        assert!(err("s3://Backups/x").contains("\"Backups\" is not a bucket name"));
        assert!(err("s3://ab").contains("is not a bucket name"));
        assert!(err("s3://backups/a//b").contains("an empty, '.' or '..' part"));
        assert!(err("s3://backups/a/../b").contains("an empty, '.' or '..' part"));
    }
}
