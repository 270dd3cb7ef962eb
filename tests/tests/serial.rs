//! The agent on a serial channel, without a VM: a pseudo-terminal in raw
//! mode stands for the guest's virtio-serial port (a character device the
//! agent keeps open), and a unix socket bridged to its other end stands
//! for QEMU's chardev socket, one host client at a time. Host clients
//! come and go; one leaves half a request behind; each next one must
//! start clean. The real port, with its hang-ups, is the VM test's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use vsnap_e2e::{random_vhd, repo_init, start_agent, vsnap_cmd, write_hook};

/// The guest's port: the pty's far end, set raw so bytes pass unchanged
/// (no echo, no line editing), and its path.
struct Port {
    master: std::fs::File,
    device: PathBuf,
    /// Held open for the test's length: with no end of the port open, the
    /// master side reads as hung up.
    slave: std::fs::File,
}

fn open_port() -> Port {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let device = PathBuf::from(name.to_str().unwrap());
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap();
    let mut t = rustix::termios::tcgetattr(&slave).unwrap();
    t.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t).unwrap();
    Port {
        master: std::fs::File::from(master),
        device,
        slave,
    }
}

/// QEMU's chardev socket, as far as a client can tell: it accepts one
/// client at a time and passes bytes both ways between it and the port;
/// what the guest writes while no client is connected is dropped.
fn chardev(port: Port, sock: &Path) {
    let listener = UnixListener::bind(sock).unwrap();
    let client: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let mut from_guest = port.master.try_clone().unwrap();
    let to_guest = port.master;
    let slave = port.slave;
    {
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            let _open = slave;
            let mut buf = [0u8; 4096];
            while let Ok(n) = from_guest.read(&mut buf) {
                if n == 0 {
                    return;
                }
                if let Some(c) = client.lock().unwrap().as_mut() {
                    let _ = c.write_all(&buf[..n]);
                }
            }
        });
    }
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            *client.lock().unwrap() = Some(conn.try_clone().unwrap());
            let mut to_guest = to_guest.try_clone().unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || to_guest.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            *client.lock().unwrap() = None;
        }
    });
}

#[test]
fn coordinated_backups_reach_the_agent_over_a_serial_port_and_each_client_starts_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = open_port();
    let device = port.device.clone();
    let sock = d.join("chardev.sock");
    chardev(port, &sock);
    // The application's writer is a hook: no filesystem is frozen, so
    // this runs without root.
    let log = d.join("hooks.log");
    write_hook(
        &d.join("hooks"),
        "10-app",
        &format!("echo \"$1\" >> {}", log.display()),
    );
    let agent = start_agent(
        &[
            "--listen",
            &format!("serial:{}", device.display()),
            "--hooks",
            d.join("hooks").to_str().unwrap(),
            "--marker",
            d.join("agent.frozen").to_str().unwrap(),
        ],
        &d.join("agent.err"),
    )
    .unwrap();
    assert_eq!(agent.address, format!("serial:{}", device.display()));

    // A client that left half a request behind, and went.
    let mut early = UnixStream::connect(&sock).unwrap();
    early.write_all(br#"{"id":7,"op":"fre"#).unwrap();
    drop(early);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let disk = d.join("disk.vhd");
    random_vhd(&disk, 8 << 20, 3, &[(0, 1 << 20)]);
    let inv = d.join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"s\"\ndisks = [\"{}\"]\nagent = \"serial:{}\"\n",
            disk.display(),
            sock.display()
        ),
    )
    .unwrap();
    let repo = d.join("repo");
    repo_init(&repo);
    for round in 0..2 {
        let o = vsnap_cmd()
            .args(["backup", "-q", "--json", "--inventory"])
            .arg(&inv)
            .arg("--repo")
            .arg(&repo)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "round {round}: {err}\n{}",
            agent.stderr()
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let vm = &r["vms"][0];
        assert_eq!(vm["consistency"], "app-consistent", "{r:#}");
        assert_eq!(
            vm["metrics"]["agent"],
            format!("serial:{}", sock.display()),
            "{vm:#}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "prepare\nfreeze\nthaw\ncomplete\n".repeat(2)
    );
}

#[test]
fn a_serial_listener_must_be_a_character_device() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-port");
    std::fs::write(&file, b"").unwrap();
    let e = start_agent(
        &[
            "--listen",
            &format!("serial:{}", file.display()),
            "--marker",
            dir.path().join("m").to_str().unwrap(),
        ],
        &dir.path().join("agent.err"),
    )
    .unwrap_err();
    assert!(
        e.contains(&format!("serial:{}", file.display())) && e.contains("not a character device"),
        "{e}"
    );
}
