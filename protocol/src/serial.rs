//! The guest end of a serial channel (a virtio-serial port): a character
//! device, not a socket. There is no accept and no connection state: host
//! clients come and go while the guest keeps the device open, and while
//! none is connected, reads return 0 (the port reports HUP). So the guest
//! end is served as one session after another over the same device:
//!
//! - a reader thread copies the device into the current session; when the
//!   host end hangs up it waits and reads again, as qemu-ga does, and ends
//!   whatever line the old client left half-sent, so the next client's
//!   first line starts clean (the client resynchronises too: it sends a
//!   newline, then `sync`, and skips everything before that reply);
//! - a writer thread copies the session's replies to the device;
//! - a session that ends (a line it cannot read) is replaced by a new one
//!   over the same device.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BoxStream;
use crate::MAX_LINE;

/// How long the reader waits after the host end hung up before it reads
/// again.
const HUP_WAIT: Duration = Duration::from_millis(100);

/// Opens the port's device read-write; anything but a character device
/// is refused, so a typo cannot make the agent talk to a regular file.
pub fn open_device(path: &Path) -> std::io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.file_type().is_char_device() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a character device (a virtio-serial port is /dev/virtio-ports/NAME, or /dev/vportNpM)",
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// What the reader thread saw.
enum Input {
    Bytes(Vec<u8>),
    /// The host end hung up: whatever it left half-sent is void.
    HangUp,
}

/// Serves the port at `path` until the process ends: `session` is called
/// with a stream for each session in turn, and a new one begins when it
/// returns.
pub async fn serve<F, Fut>(path: &Path, mut session: F) -> std::io::Result<()>
where
    F: FnMut(BoxStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let device = open_device(path)?;
    let mut reader = device.try_clone()?;
    let mut writer = device;
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Input>(16);
    std::thread::Builder::new()
        .name("serial-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            let mut connected = true;
            loop {
                match reader.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        connected = true;
                        if in_tx
                            .blocking_send(Input::Bytes(buf[..n].to_vec()))
                            .is_err()
                        {
                            return;
                        }
                    }
                    // 0, or an error such as EIO: no host end now.
                    _ => {
                        if connected {
                            connected = false;
                            if in_tx.blocking_send(Input::HangUp).is_err() {
                                return;
                            }
                        }
                        std::thread::sleep(HUP_WAIT);
                    }
                }
            }
        })?;
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name("serial-write".into())
        .spawn(move || {
            // With no host end, a reply has nobody to go to: it is
            // dropped, and the next client resynchronises past anything
            // stale.
            while let Ok(bytes) = out_rx.recv() {
                let _ = writer.write_all(&bytes);
            }
        })?;
    loop {
        let (ours, theirs) = tokio::io::duplex(2 * MAX_LINE);
        let running = tokio::spawn(session(Box::new(ours)));
        let (mut from_session, mut to_session) = tokio::io::split(theirs);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            tokio::select! {
                input = in_rx.recv() => match input {
                    Some(Input::Bytes(b)) => {
                        if to_session.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Input::HangUp) => {
                        if to_session.write_all(b"\n").await.is_err() {
                            break;
                        }
                    }
                    None => return Ok(()),
                },
                n = from_session.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out_tx.send(buf[..n].to_vec()).is_err() {
                            return Ok(());
                        }
                    }
                },
            }
        }
        running.abort();
    }
}
