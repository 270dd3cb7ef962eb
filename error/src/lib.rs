//! The context half of the storage crates' errors.
//!
//! The formats, the engine and the repository each have their own
//! [`ErrorKind`](https://docs.rs/thiserror) saying *what* went wrong; all
//! three say *where* the same way: the file, the offset in it and the
//! operation. [`context_error!`] writes that half once, as a local type in
//! each crate, so a crate can convert its dependencies' errors with `?`
//! (a generic struct shared across crates could not: the orphan rule
//! forbids `From<vsnap_formats::Error>` for a foreign generic type).
//!
//! The rule every library follows (docs/design.md): the message shows the
//! context and the kind; a wrapped cause is reached only through
//! `source()`, never also printed in the message, so a rendered chain
//! names each cause exactly once.

use std::fmt;
use std::path::Path;

/// An error and each of its causes, joined by `: `, as `anyhow` prints
/// `{:#}`: for logs, webhooks and reports that carry one line. Under the
/// rule above each cause appears once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Writes `path: op at offset N: ` before a kind's message, leaving out
/// what is not known. Shared by every [`context_error!`] type so they all
/// read alike.
pub fn write_context(
    f: &mut fmt::Formatter<'_>,
    path: Option<&Path>,
    offset: Option<u64>,
    op: Option<&'static str>,
) -> fmt::Result {
    if let Some(path) = path {
        write!(f, "{}: ", path.display())?;
    }
    if let Some(op) = op {
        write!(f, "{op}")?;
        match offset {
            Some(offset) => write!(f, " at offset {offset}: "),
            None => f.write_str(": "),
        }
    } else if let Some(offset) = offset {
        write!(f, "at offset {offset}: ")
    } else {
        Ok(())
    }
}

/// Defines `Error` (a `$kind` plus file, offset and operation), `Result`,
/// `From<$kind>`, `From<std::io::Error>` (as `$kind::$io`) and the
/// crate-private `ResultExt` that adds context at an I/O site in one call.
#[macro_export]
macro_rules! context_error {
    ($kind:ident, $io:ident) => {
        /// Shorthand used throughout the crate.
        pub type Result<T, E = Error> = ::std::result::Result<T, E>;

        /// An [`ErrorKind`] with the file, offset and operation it happened in.
        #[derive(Debug)]
        pub struct Error {
            kind: $kind,
            path: Option<::std::path::PathBuf>,
            offset: Option<u64>,
            op: Option<&'static str>,
        }

        #[allow(dead_code)]
        impl Error {
            pub fn new(kind: $kind) -> Self {
                Self {
                    kind,
                    path: None,
                    offset: None,
                    op: None,
                }
            }

            pub fn kind(&self) -> &$kind {
                &self.kind
            }

            pub fn path(&self) -> Option<&::std::path::Path> {
                self.path.as_deref()
            }

            pub fn offset(&self) -> Option<u64> {
                self.offset
            }

            pub fn op(&self) -> Option<&'static str> {
                self.op
            }

            /// Names the file, unless an inner layer (a parent image) already did.
            #[must_use]
            pub fn in_file(mut self, path: &::std::path::Path) -> Self {
                if self.path.is_none() {
                    self.path = Some(path.to_path_buf());
                }
                self
            }

            /// Sets the offset, unless a more precise inner one is already known.
            #[must_use]
            pub fn at(mut self, offset: u64) -> Self {
                if self.offset.is_none() {
                    self.offset = Some(offset);
                }
                self
            }

            /// Turns an offset relative to a structure into a file offset.
            #[must_use]
            pub fn rebase(mut self, base: u64) -> Self {
                self.offset = Some(base.saturating_add(self.offset.unwrap_or(0)));
                self
            }

            /// Names the operation, unless an inner layer already did.
            #[must_use]
            pub fn during(mut self, op: &'static str) -> Self {
                if self.op.is_none() {
                    self.op = Some(op);
                }
                self
            }

            /// Another crate's error of the same shape, its kind mapped into
            /// this crate's and its context kept as it was: a parse error
            /// that named its file and offset still does.
            pub fn lift<K>(
                kind: K,
                parts: (
                    Option<::std::path::PathBuf>,
                    Option<u64>,
                    Option<&'static str>,
                ),
                map: impl FnOnce(K) -> $kind,
            ) -> Self {
                let (path, offset, op) = parts;
                Self {
                    kind: map(kind),
                    path,
                    offset,
                    op,
                }
            }

            /// The kind and the context apart, for [`Error::lift`].
            #[allow(clippy::type_complexity)]
            pub fn into_parts(
                self,
            ) -> (
                $kind,
                (
                    Option<::std::path::PathBuf>,
                    Option<u64>,
                    Option<&'static str>,
                ),
            ) {
                (self.kind, (self.path, self.offset, self.op))
            }

            pub(crate) fn io(err: ::std::io::Error) -> Self {
                Self::new($kind::$io(err))
            }

            /// A worker thread panicked (a poisoned lock, a lost result):
            /// the run's outcome cannot be trusted.
            pub(crate) fn worker_panicked() -> Self {
                Self::io(::std::io::Error::other("a worker panicked"))
            }
        }

        impl From<$kind> for Error {
            fn from(kind: $kind) -> Self {
                Self::new(kind)
            }
        }

        impl From<::std::io::Error> for Error {
            fn from(err: ::std::io::Error) -> Self {
                Self::io(err)
            }
        }

        impl ::std::fmt::Display for Error {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                $crate::write_context(f, self.path.as_deref(), self.offset, self.op)?;
                write!(f, "{}", self.kind)
            }
        }

        impl ::std::error::Error for Error {
            fn source(&self) -> Option<&(dyn ::std::error::Error + 'static)> {
                ::std::error::Error::source(&self.kind)
            }
        }

        /// Adds context to results in one call at each I/O site.
        #[allow(dead_code)]
        pub(crate) trait ResultExt<T> {
            /// For I/O at a place in a file.
            fn ctx(self, path: &::std::path::Path, offset: u64, op: &'static str) -> Result<T>;
            /// For operations on a whole file (open, stat, flush), where an
            /// offset would only be noise.
            fn ctx_file(self, path: &::std::path::Path, op: &'static str) -> Result<T>;
        }

        impl<T, E: Into<Error>> ResultExt<T> for ::std::result::Result<T, E> {
            fn ctx(self, path: &::std::path::Path, offset: u64, op: &'static str) -> Result<T> {
                self.map_err(|e| e.into().in_file(path).at(offset).during(op))
            }

            fn ctx_file(self, path: &::std::path::Path, op: &'static str) -> Result<T> {
                self.map_err(|e| e.into().in_file(path).during(op))
            }
        }
    };
}

/// Defines `Error` (a `$kind` plus where it happened, as text: the
/// endpoint, mount or file, and what was being done), `Result`,
/// `From<$kind>` and `From<std::io::Error>` (as `$kind::$io`): the shape
/// of the errors of the crates that talk to guests (protocol,
/// coordinator), whose places are endpoints and sessions, not files and
/// offsets. The first `at` and `during` given win: the innermost knows
/// best.
#[macro_export]
macro_rules! labelled_error {
    ($kind:ident, $io:ident) => {
        /// Shorthand used throughout the crate.
        pub type Result<T, E = Error> = ::std::result::Result<T, E>;

        /// An [`ErrorKind`] with where it happened.
        #[derive(Debug)]
        pub struct Error {
            pub kind: $kind,
            /// The endpoint, mount or file the error concerns.
            pub at: Option<String>,
            /// What was being done.
            pub during: Option<String>,
        }

        impl Error {
            pub fn new(kind: $kind) -> Self {
                Error {
                    kind,
                    at: None,
                    during: None,
                }
            }

            pub fn at(mut self, at: impl Into<String>) -> Self {
                self.at.get_or_insert_with(|| at.into());
                self
            }

            pub fn during(mut self, what: impl Into<String>) -> Self {
                self.during.get_or_insert_with(|| what.into());
                self
            }
        }

        impl ::std::fmt::Display for Error {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                if let Some(at) = &self.at {
                    write!(f, "{at}: ")?;
                }
                if let Some(during) = &self.during {
                    write!(f, "{during}: ")?;
                }
                write!(f, "{}", self.kind)
            }
        }

        impl ::std::error::Error for Error {
            fn source(&self) -> Option<&(dyn ::std::error::Error + 'static)> {
                ::std::error::Error::source(&self.kind)
            }
        }

        impl From<$kind> for Error {
            fn from(kind: $kind) -> Self {
                Error::new(kind)
            }
        }

        impl From<::std::io::Error> for Error {
            fn from(e: ::std::io::Error) -> Self {
                Error::new($kind::$io(e))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[derive(Debug, thiserror::Error)]
    pub(crate) enum Kind {
        #[error("the store refused")]
        Refused {
            #[source]
            cause: std::io::Error,
        },
        #[error("I/O error: {0}")]
        Io(std::io::Error),
    }

    crate::context_error!(Kind, Io);

    fn chain(e: &Error) -> String {
        crate::chain(e)
    }

    #[test]
    fn a_wrapped_cause_appears_once_in_the_chain() {
        let e = Error::new(Kind::Refused {
            cause: std::io::Error::other("connection reset"),
        })
        .in_file(std::path::Path::new("/r/config"))
        .at(7)
        .during("read");
        assert_eq!(
            chain(&e),
            "/r/config: read at offset 7: the store refused: connection reset"
        );
        let io = Error::from(std::io::Error::other("disk gone")).during("flush");
        assert_eq!(chain(&io), "flush: I/O error: disk gone");
    }

    #[test]
    fn inner_context_wins_and_lifting_keeps_it() {
        let e = Error::io(std::io::Error::other("x"))
            .in_file(std::path::Path::new("parent.vhd"))
            .in_file(std::path::Path::new("child.vhd"))
            .during("inner")
            .during("outer")
            .rebase(512);
        assert_eq!(e.path(), Some(std::path::Path::new("parent.vhd")));
        assert_eq!((e.offset(), e.op()), (Some(512), Some("inner")));
        let text = e.to_string();
        let (kind, parts) = e.into_parts();
        let lifted = Error::lift(kind, parts, |k| k);
        assert_eq!(lifted.to_string(), text);
    }
}
