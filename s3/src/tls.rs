//! Which TLS certificates the client trusts beyond the host's own: an
//! on-premises object store (Ceph RGW, MinIO, Garage) often serves a
//! certificate from a private CA, which the AWS tools take from the PEM
//! bundle `AWS_CA_BUNDLE` names. vsnap reads the same variable.

use std::path::PathBuf;

use object_store::Certificate;
use vsnap_repo::{Error, ErrorKind, Result};

/// The environment variable the AWS CLI and SDKs read for a CA bundle.
pub(crate) const CA_BUNDLE: &str = "AWS_CA_BUNDLE";

/// Bundles are a few certificates; a system bundle is some 200 KiB.
const BUNDLE_LIMIT: u64 = 16 << 20;

/// The certificates of the bundle `AWS_CA_BUNDLE` names, none where it is
/// unset. A bundle that cannot be read, or holds no certificate, is an
/// error naming the file: trusting less than the operator asked for would
/// only fail later, as an unknown issuer.
pub(crate) fn ca_bundle() -> Result<Vec<Certificate>> {
    let Some(path) = std::env::var_os(CA_BUNDLE).filter(|p| !p.is_empty()) else {
        return Ok(Vec::new());
    };
    let path = PathBuf::from(path);
    let bad = |reason: String| {
        Error::from(ErrorKind::InvalidArgument(format!("{CA_BUNDLE}: {reason}")))
            .in_file(&path)
            .during("read the CA bundle")
    };
    let size = std::fs::metadata(&path)
        .map_err(|e| bad(format!("cannot read it ({e})")))?
        .len();
    if size > BUNDLE_LIMIT {
        return Err(bad(format!(
            "{size} bytes is past the {BUNDLE_LIMIT} a PEM bundle may have"
        )));
    }
    let pem = std::fs::read(&path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("not a PEM certificate bundle ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no certificate (a PEM bundle has -----BEGIN CERTIFICATE----- blocks)".into(),
        ));
    }
    Ok(certs)
}
