//! The repository in a bucket behind HTTPS, as on-premises object stores
//! serve it: a certificate from a private CA, trusted through the AWS
//! tools' `AWS_CA_BUNDLE`, and request bodies left out of the signature
//! (`AWS_UNSIGNED_PAYLOAD`) only where TLS checks them in transit. The
//! server is s3s-fs behind a TLS front and the counting proxy, so the
//! signatures it checks are the ones vsnap made for the front.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use vsnap_e2e::fault_proxy::{FaultProxy, Faults};
use vsnap_e2e::s3::{env_for, restores_to_its_digest, S3Server, ACCESS_KEY, SECRET_KEY};
use vsnap_e2e::tls::TlsFront;
use vsnap_e2e::*;

const MIB: u64 = 1 << 20;

#[test]
fn an_https_endpoint_is_trusted_through_aws_ca_bundle_and_may_leave_bodies_unsigned() {
    let test = "an_https_endpoint_is_trusted_through_aws_ca_bundle_and_may_leave_bodies_unsigned";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(([127, 0, 0, 1], s3.port).into(), Faults::default(), 1).unwrap();
    let front = TlsFront::start(proxy.addr, dir.path());
    let https = front.endpoint();
    let ca = front.ca.to_str().unwrap().to_owned();
    let url = "s3://vsnap/tls";
    let vsnap = |endpoint: &str, env: &[(&str, &str)], args: &[&str]| -> (Output, Duration) {
        let mut c = vsnap_cmd();
        env_for(&mut c, endpoint, ACCESS_KEY, SECRET_KEY);
        for (k, v) in env {
            c.env(k, v);
        }
        let t = Instant::now();
        let o = c.args(args).output().unwrap();
        (o, t.elapsed())
    };
    let ok = |env: &[(&str, &str)], args: &[&str]| -> String {
        let (o, _) = vsnap(&https, env, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    };
    let fails = |endpoint: &str, env: &[(&str, &str)], args: &[&str]| -> (String, Duration) {
        let (o, took) = vsnap(endpoint, env, args);
        assert!(!o.status.success(), "{args:?} succeeded: {}", stdout(&o));
        (stderr(&o), took)
    };

    // Without the CA, the certificate is refused, and the error names the
    // fix, within seconds.
    let (err, took) = fails(&https, &[], &["repo", "init", url]);
    assert!(
        err.contains(&format!(
            "the TLS certificate of {https} is not trusted here"
        )),
        "{err}"
    );
    assert!(err.contains("AWS_CA_BUNDLE"), "{err}");
    eprintln!("untrusted certificate: refused in {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // A bundle that is not there, or holds no certificate, is named.
    let missing = dir.path().join("none.pem");
    let (err, _) = fails(
        &https,
        &[("AWS_CA_BUNDLE", missing.to_str().unwrap())],
        &["repo", "init", url],
    );
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("AWS_CA_BUNDLE: cannot read it"), "{err}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (err, _) = fails(
        &https,
        &[("AWS_CA_BUNDLE", junk.to_str().unwrap())],
        &["repo", "init", url],
    );
    assert!(err.contains("AWS_CA_BUNDLE: holds no certificate"), "{err}");
    assert_eq!(
        proxy.tally().put,
        0,
        "nothing may reach the server untrusted"
    );

    // With the CA: the repository works as over plain HTTP, and bodies
    // are signed by default.
    let trusted = [("AWS_CA_BUNDLE", ca.as_str())];
    ok(
        &trusted,
        &[
            "repo",
            "init",
            "--chunk-size",
            "1M",
            "--pack-size",
            "2M",
            url,
        ],
    );
    let backup = |env: &[(&str, &str)], seed: u64| -> Value {
        let img = dir.path().join(format!("d{seed}.vhd"));
        random_vhd(&img, 8 * MIB, seed, &[(0, 6 * MIB)]);
        let out = ok(
            env,
            &[
                "backup",
                "-q",
                "--json",
                "--name",
                "vm1",
                "--repo",
                url,
                img.to_str().unwrap(),
            ],
        );
        serde_json::from_str(&out).unwrap()
    };
    let verified = |env: &[(&str, &str)]| {
        let v: Value =
            serde_json::from_str(&ok(env, &["verify", "-q", "--json", "--repo", url])).unwrap();
        assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    };
    let before = proxy.tally();
    let signed = backup(&trusted, 11);
    let after = proxy.tally();
    assert!(after.put - before.put >= 3, "{before:?} {after:?}");
    assert_eq!(after.unsigned_puts, 0, "{after:?}");

    // AWS_UNSIGNED_PAYLOAD over HTTPS: every PUT leaves its body out of
    // the signature, the server takes them, and what they stored verifies
    // and restores exactly.
    let unsigned_env = [
        ("AWS_CA_BUNDLE", ca.as_str()),
        ("AWS_UNSIGNED_PAYLOAD", "true"),
    ];
    let before = proxy.tally();
    let unsigned = backup(&unsigned_env, 12);
    let after = proxy.tally();
    let puts = after.put - before.put;
    assert!(puts >= 3, "{before:?} {after:?}");
    assert_eq!(
        after.unsigned_puts - before.unsigned_puts,
        puts,
        "{after:?}"
    );
    assert!(
        unsigned["disks"][0]["new_chunks"].as_u64().unwrap() >= 6,
        "{unsigned}"
    );
    verified(&trusted);
    restores_to_its_digest(&|a| ok(&trusted, a), url, &signed, dir.path());
    restores_to_its_digest(&|a| ok(&unsigned_env, a), url, &unsigned, dir.path());

    // Over plain HTTP nothing would check an unsigned body: refused.
    let (err, _) = fails(
        &s3.endpoint(),
        &[("AWS_UNSIGNED_PAYLOAD", "true")],
        &["snapshots", "--repo", url],
    );
    assert!(
        err.contains(&format!(
            "AWS_UNSIGNED_PAYLOAD is on, but {} is plain HTTP",
            s3.endpoint()
        )),
        "{err}"
    );
}
