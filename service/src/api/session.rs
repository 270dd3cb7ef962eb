//! The dashboard's sign-in, so that a browser never holds the long-lived
//! token: a URL ends up in the history database, session restore files
//! and the address bar's suggestions, where anyone who reads the
//! profile finds it.
//!
//! Whoever can read the token (`vsnap dashboard`, `vsnap demo --serve`)
//! mints a **one-time code**: its expiry, a random nonce, and a MAC over
//! both keyed from the token. No call to the service is needed, and a
//! code cannot be forged or lengthened without the token. The service
//! takes a code once, within [`CODE_LIFE`], and answers with a **session
//! cookie** (HttpOnly, so no script reads it; SameSite=Strict, so no
//! other site's page sends it), kept in memory for [`SESSION_LIFE`]: a
//! restart of the service signs every browser out. A link left in the
//! history is spent or expired.
//!
//! A request that the cookie authorizes must also carry [`HEADER`]: a
//! form on another site cannot set a header, and a script on another
//! site cannot send one without a CORS preflight the API never grants.

use std::collections::HashMap;
use std::sync::Mutex;

use subtle::ConstantTimeEq;

/// How long a one-time code lives, in seconds.
pub const CODE_LIFE: u64 = 60;
/// How long a dashboard session lives, in seconds.
pub const SESSION_LIFE: u64 = 12 * 3600;
/// The session cookie's name.
pub const COOKIE: &str = "vsnap_session";
/// The header every request with the session cookie carries.
pub const HEADER: &str = "x-vsnap-dashboard";
/// Sessions kept at once; the one that ends first makes room.
const MAX_SESSIONS: usize = 256;
/// Spent codes remembered at once (each only until it would expire).
const MAX_SPENT: usize = 4096;

const KEY_CONTEXT: &str = "vsnap 2026-12 dashboard one-time code";

/// Why a code is not taken. The answer to the browser says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    Forged,
    Expired,
    Spent,
    /// More codes in flight than [`MAX_SPENT`]: somebody with the token
    /// is minting in a loop.
    Busy,
    /// The system's random source failed.
    NoRandom(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Malformed => "this sign-in link is not one vsnap made",
            Refusal::Forged => "this sign-in link was not made with this service's token",
            Refusal::Expired => "this sign-in link has expired (a link works for 60 s)",
            Refusal::Spent => "this sign-in link was used already (a link works once)",
            Refusal::Busy => "too many sign-in links are in flight; try again in a minute",
            Refusal::NoRandom(why) => return write!(f, "no random bytes for a session: {why}"),
        })?;
        f.write_str("; `vsnap dashboard --config FILE` prints a new one")
    }
}

fn key(token: &str) -> [u8; 32] {
    blake3::derive_key(KEY_CONTEXT, token.trim().as_bytes())
}

/// The MAC of a code: 128 bits of a keyed BLAKE3 over expiry and nonce.
fn mac(key: &[u8; 32], expiry: u64, nonce: &[u8; 16]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&expiry.to_le_bytes());
    h.update(nonce);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A one-time code for the service whose token is `token`, good until
/// `now + CODE_LIFE` (seconds since the epoch). Only hex digits and
/// dashes, so it goes into a URL as it is.
pub fn mint(token: &str, now: u64) -> crate::error::Result<String> {
    let nonce: [u8; 16] = super::token::random()?;
    let expiry = now.saturating_add(CODE_LIFE);
    Ok(format!(
        "{expiry:x}-{}-{}",
        hex(&nonce),
        hex(&mac(&key(token), expiry, &nonce))
    ))
}

/// The service's side: which codes were spent, which sessions live.
pub struct Sessions {
    key: [u8; 32],
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Nonce of each spent code, to when the code would expire.
    spent: HashMap<[u8; 16], u64>,
    /// BLAKE3 of each session's id, to when it ends: what a lookup's
    /// timing could tell is about a hash, not about a live id.
    live: HashMap<[u8; 32], u64>,
}

impl Sessions {
    pub fn new(token: &str) -> Sessions {
        Sessions {
            key: key(token),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing here is left half-done by a panic: the maps hold
        // whole entries.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `code` at `now`, once: the new session's id, for the cookie.
    pub fn redeem(&self, code: &str, now: u64) -> Result<String, Refusal> {
        let mut parts = code.trim().splitn(3, '-');
        let (Some(e), Some(n), Some(m)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Refusal::Malformed);
        };
        let expiry = (e.len() <= 16)
            .then(|| u64::from_str_radix(e, 16).ok())
            .flatten()
            .ok_or(Refusal::Malformed)?;
        let nonce = unhex::<16>(n).ok_or(Refusal::Malformed)?;
        let given = unhex::<16>(m).ok_or(Refusal::Malformed)?;
        if !bool::from(mac(&self.key, expiry, &nonce).ct_eq(&given)) {
            return Err(Refusal::Forged);
        }
        // A code claiming a longer life than any minted one is refused
        // too: the lifetime is the service's rule, not the link's.
        if expiry <= now || expiry > now.saturating_add(CODE_LIFE) {
            return Err(Refusal::Expired);
        }
        let id: [u8; 32] = super::token::random().map_err(|e| Refusal::NoRandom(e.to_string()))?;
        let mut inner = self.inner();
        inner.spent.retain(|_, until| *until > now);
        if inner.spent.contains_key(&nonce) {
            return Err(Refusal::Spent);
        }
        if inner.spent.len() >= MAX_SPENT {
            return Err(Refusal::Busy);
        }
        inner.spent.insert(nonce, expiry);
        inner.live.retain(|_, until| *until > now);
        if inner.live.len() >= MAX_SESSIONS {
            let first = inner
                .live
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(k, _)| *k);
            if let Some(k) = first {
                inner.live.remove(&k);
            }
        }
        inner.live.insert(
            *blake3::hash(&id).as_bytes(),
            now.saturating_add(SESSION_LIFE),
        );
        Ok(hex(&id))
    }

    /// Whether `session` (a cookie's value) is live at `now`.
    pub fn check(&self, session: &str, now: u64) -> bool {
        unhex::<32>(session).is_some_and(|id| {
            self.inner()
                .live
                .get(blake3::hash(&id).as_bytes())
                .is_some_and(|&until| until > now)
        })
    }

    /// Ends `session` (signing out).
    pub fn end(&self, session: &str) {
        if let Some(id) = unhex::<32>(session) {
            self.inner().live.remove(blake3::hash(&id).as_bytes());
        }
    }
}

/// The session cookie's value among a request's `Cookie` headers.
pub fn cookie<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.trim())
}

/// The `Set-Cookie` value that starts the session `id`; with an empty
/// `id`, the one that ends it in the browser. Not `Secure`: the service
/// speaks plain HTTP, on loopback by default, and a browser would drop
/// a Secure cookie set over it.
pub fn set_cookie(id: &str) -> String {
    let life = if id.is_empty() { 0 } else { SESSION_LIFE };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={life}")
}

/// Where a service records the address it listens on, for a
/// configuration whose port is 0 (any free one).
pub const ADDRESS_FILE: &str = "api.address";

/// A sign-in link to the dashboard of the service listening on `listen`
/// with its state in `state_dir`: the token read there (never made), a
/// code minted with it. Port 0 is the one the service recorded; a
/// service listening on every address is reached on loopback.
pub fn sign_in_link(
    listen: std::net::SocketAddr,
    state_dir: &std::path::Path,
) -> crate::error::Result<String> {
    use crate::error::ErrorKind;
    let token = super::token::load(state_dir)?;
    let mut at = listen;
    if at.port() == 0 {
        let path = state_dir.join(ADDRESS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            crate::Error::from(ErrorKind::Io(e)).at(format!(
                "{}: the address of a service configured with port 0 (is it running?)",
                path.display()
            ))
        })?;
        at = text.trim().parse().map_err(|_| {
            crate::Error::from(ErrorKind::Config(format!(
                "not an address: {:?}",
                text.trim()
            )))
            .at(path.display().to_string())
        })?;
    }
    if at.ip().is_unspecified() {
        at.set_ip(match at {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{at}/login?code={}", mint(&token, now())?))
}

/// Seconds since the epoch, as codes and sessions count them.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_code_is_taken_once_within_its_minute_and_only_with_its_token() {
        let s = Sessions::new(TOKEN);
        let now = 1_800_000_000;
        let code = mint(TOKEN, now).unwrap();
        assert!(
            code.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
            "{code}"
        );
        assert_eq!(s.redeem(&code, now + CODE_LIFE), Err(Refusal::Expired));
        let id = s.redeem(&code, now + 5).unwrap();
        assert!(s.check(&id, now + 5));
        assert_eq!(s.redeem(&code, now + 6), Err(Refusal::Spent));
        // Another service's token, a changed expiry, a changed MAC.
        let other = mint("fedcba9876543210fedcba9876543210", now).unwrap();
        assert_eq!(s.redeem(&other, now), Err(Refusal::Forged));
        let fresh = mint(TOKEN, now).unwrap();
        let (e, rest) = fresh.split_once('-').unwrap();
        let longer = u64::from_str_radix(e, 16).unwrap() + 3600;
        assert_eq!(
            s.redeem(&format!("{longer:x}-{rest}"), now),
            Err(Refusal::Forged)
        );
        let mut flipped = fresh.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(s.redeem(&flipped, now), Err(Refusal::Forged));
        for bad in ["", "x", "1-2-3", "ffffffffffffffffff-00-00", &fresh[1..]] {
            assert!(
                matches!(
                    s.redeem(bad, now),
                    Err(Refusal::Malformed | Refusal::Forged)
                ),
                "{bad:?}"
            );
        }
        assert!(s.redeem(&fresh, now).is_ok());
        assert!(Refusal::Spent
            .to_string()
            .contains("vsnap dashboard --config FILE"));
    }

    #[test]
    fn a_session_ends_when_signed_out_or_when_its_time_is_up() {
        let s = Sessions::new(TOKEN);
        let now = 1_800_000_000;
        let a = s.redeem(&mint(TOKEN, now).unwrap(), now).unwrap();
        let b = s.redeem(&mint(TOKEN, now).unwrap(), now).unwrap();
        assert_ne!(a, b);
        s.end(&a);
        assert!(!s.check(&a, now) && s.check(&b, now));
        assert!(!s.check(&b, now + SESSION_LIFE));
        assert!(!s.check("", now) && !s.check("zz", now) && !s.check(&b[1..], now));
    }

    #[test]
    fn sessions_and_spent_codes_are_bounded() {
        let s = Sessions::new(TOKEN);
        let now = 1_800_000_000;
        let first = s.redeem(&mint(TOKEN, now).unwrap(), now).unwrap();
        for i in 1..=MAX_SESSIONS as u64 {
            s.redeem(&mint(TOKEN, now + i).unwrap(), now + i).unwrap();
        }
        // The session that ends first made room for the newest.
        assert!(!s.check(&first, now + 1));
        assert_eq!(s.inner().live.len(), MAX_SESSIONS);
        // Spent codes are forgotten once they would have expired.
        assert!(s.inner().spent.len() <= CODE_LIFE as usize + 1);
        // Within one minute, at most MAX_SPENT codes are taken.
        let later = now + 10 * CODE_LIFE;
        for _ in 0..MAX_SPENT {
            s.redeem(&mint(TOKEN, later).unwrap(), later).unwrap();
        }
        let busy = s.redeem(&mint(TOKEN, later).unwrap(), later);
        assert_eq!(busy, Err(Refusal::Busy));
        assert!(s
            .redeem(&mint(TOKEN, later + CODE_LIFE).unwrap(), later + CODE_LIFE)
            .is_ok());
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_with_its_attributes() {
        assert_eq!(cookie(["a=1; vsnap_session=abc ;b=2"]), Some("abc"));
        assert_eq!(cookie(["a=1", "vsnap_session=x"]), Some("x"));
        assert_eq!(cookie(["vsnap_sessionx=1"]), None);
        let set = set_cookie("abc");
        for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(set.contains(attr), "{set}");
        }
        assert!(set_cookie("").contains("Max-Age=0"));
    }
}
