#![allow(clippy::unwrap_used)]

use super::*;

const VMS: &str = r#"
repository = "repo"
state_dir = "/tmp/vsnap-state"

[[vm]]
name = "web1"
disks = ["web1.vhd"]
agent = "unix:/run/vsnap/web1.sock"

[[vm]]
name = "db"
disks = ["db.vhd"]
agent = "none"
"#;

fn parse(extra: &str) -> Result<Config> {
    Config::parse(&format!("{VMS}{extra}"), Path::new("/etc/vsnap/serve.toml"))
}

fn err(extra: &str) -> String {
    parse(extra).unwrap_err().to_string()
}

/// The line `needle` is on, in the whole text.
fn line_of(extra: &str, needle: &str) -> usize {
    let text = format!("{VMS}{extra}");
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

#[test]
fn a_full_configuration_reads_with_defaults_filled_in() {
    let c = parse(
        r#"
[[job]]
name = "nightly"
schedule = "Mon..Fri 02:00"
keep = { daily = 7, weekly = 4, within = "2d" }
gc = true
notify = ["ops"]

[[job]]
name = "db-hourly"
schedule = "hourly"
vms = ["db"]
provider = "copy"
window = "3s"
persistent = false

[[verify]]
name = "weekly"
schedule = "Sun 04:00"
outdated_after = "30d"

[[notify]]
name = "ops"
url = "http://127.0.0.1:9000/hook"
"#,
    )
    .unwrap();
    assert_eq!(c.repository, Path::new("/etc/vsnap/repo"));
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.vms.len(), 2);
    let (a, b) = (&c.jobs[0], &c.jobs[1]);
    assert_eq!(a.vms, ["web1", "db"]);
    assert!(a.persistent && a.gc);
    assert_eq!(a.window, Duration::from_secs(10));
    assert_eq!(a.keep.unwrap().daily, 7);
    assert_eq!(a.notify, ["ops"]);
    assert_eq!(b.vms, ["db"]);
    assert_eq!(
        b.provider,
        Choice::Force(vsnap_coordinator::provider::Kind::Copy)
    );
    assert_eq!(b.window, Duration::from_secs(3));
    assert!(!b.persistent && b.keep.is_none());
    assert_eq!(
        c.verifies[0].outdated_after,
        Some(Duration::from_secs(30 * 86400))
    );
    assert_eq!(c.notify[0].retries, 3);
}

#[test]
fn errors_name_the_file_the_line_and_the_key() {
    let extra = "\n[[job]]\nname = \"nightly\"\nschedule = \"Mon..Fry 02:00\"\n";
    let e = err(extra);
    assert_eq!(
        e,
        format!(
            "/etc/vsnap/serve.toml:{}: job[0] (\"nightly\").schedule: calendar event \"Mon..Fry 02:00\": \"Mon..Fry\" is not a weekday or a range of them",
            line_of(extra, "schedule")
        )
    );
    let extra = "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\nvms = [\"web2\"]\n";
    let e = err(extra);
    assert!(
        e.starts_with(&format!(
            "/etc/vsnap/serve.toml:{}: job[0] (\"n\").vms: no VM \"web2\"; the VMs are web1, db",
            line_of(extra, "vms")
        )),
        "{e}"
    );
    let extra = "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\nwindow = \"soon\"\n";
    assert!(err(extra).contains(&format!(
        ":{}: job[0] (\"n\").window: \"soon\"",
        line_of(extra, "window")
    )));
    let extra = "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\nkeep = {}\n";
    assert!(err(extra).contains("job[0] (\"n\").keep: keeps everything"));
    let extra =
        "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\nkeep = { daily = 1, within = \"2w\" }\n";
    let e = err(extra);
    assert!(e.contains("job[0] (\"n\").keep.within: invalid argument: keep-within \"2w\": units are y, m, d and h"), "{e}");
    let extra = "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\nnotify = [\"pager\"]\n";
    assert!(err(extra).contains("job[0] (\"n\").notify: no [[notify]] named \"pager\""));
    let extra = "\n[[job]]\nname = \"n\"\nschedule = \"daily\"\n[[job]]\nname = \"n\"\nschedule = \"daily\"\n";
    assert!(err(extra).contains("job[1] (\"n\").name: a job's name must be unique"));
    let extra = "\n[[notify]]\nname = \"x\"\nurl = \"ftp://x\"\n";
    assert!(err(extra).contains(&format!(
        ":{}: notify[0] (\"x\").url: \"ftp://x\": an http:// or https:// URL",
        line_of(extra, "url")
    )));
    let extra = "\n[[notify]]\nname = \"x\"\nurl = \"https://x\"\nca = \"no-such-ca.pem\"\n";
    let e = err(extra);
    assert!(
        e.contains(&format!(
            ":{}: notify[0] (\"x\").ca: ",
            line_of(extra, "ca ")
        )) && e.contains("no-such-ca.pem: cannot read it"),
        "{e}"
    );
}

#[test]
fn what_toml_itself_refuses_names_the_line() {
    let extra = "\n[[job]]\nname = \"n\"\nschedul = \"daily\"\n";
    let e = err(extra);
    assert!(
        e.starts_with(&format!(
            "/etc/vsnap/serve.toml:{}: toml: unknown field `schedul`",
            line_of(extra, "schedul")
        )),
        "{e}"
    );
    let e = Config::parse("repository = \"r\"\nlisten = \"localhost\"\n[[vm]]\nname = \"a\"\ndisks = [\"a.vhd\"]\nagent = \"none\"\n", Path::new("s.toml")).unwrap_err().to_string();
    assert!(
        e.starts_with("s.toml:2: listen: \"localhost\": invalid socket address"),
        "{e}"
    );
    let e = Config::parse("repository = \"r\"\n", Path::new("s.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vm: no VMs: add inventory = FILE, or [[vm]] tables"),
        "{e}"
    );
}

#[test]
fn a_bucket_address_is_kept_as_written() {
    let text = "repository = \"s3://backups/site-a\"\n[[vm]]\nname = \"a\"\ndisks = [\"a.vhd\"]\nagent = \"none\"\n";
    let c = Config::parse(text, Path::new("/etc/vsnap/serve.toml")).unwrap();
    assert_eq!(c.repository, Path::new("s3://backups/site-a"));
    let c = Config::parse(
        &text.replace("s3://backups/site-a", "repo"),
        Path::new("/etc/vsnap/serve.toml"),
    )
    .unwrap();
    assert_eq!(c.repository, Path::new("/etc/vsnap/repo"));
}
