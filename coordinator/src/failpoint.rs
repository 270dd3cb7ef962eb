//! Kill points for the crash tests: with the `failpoints` feature (the
//! test suite's build), `FAILPOINTS=NAME=return` makes the coordinator
//! SIGKILL itself at that step, exactly there, as an operator's `kill -9`
//! or a power cut would. Without the feature a kill point is nothing.

/// A step the crash tests kill the coordinator at.
#[cfg(feature = "failpoints")]
macro_rules! kill_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::failpoint::kill_self($name))
    };
}

#[cfg(not(feature = "failpoints"))]
macro_rules! kill_point {
    ($name:literal) => {};
}

pub(crate) use kill_point;

/// Dies by SIGKILL, as if killed from outside: no destructor, no thaw.
#[cfg(feature = "failpoints")]
pub(crate) fn kill_self<T>(name: &str) -> T {
    eprintln!("vsnap: kill point {name}: SIGKILL");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    loop {
        std::thread::park();
    }
}

/// Reads `FAILPOINTS` from the environment, in a build with the
/// `failpoints` feature; nothing otherwise.
pub fn from_env() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}
