//! Layer 2, the watchdog: keepfix's one background thread and everything only it runs. Code here
//! may allocate (keepfix's own heap), read /proc and take its time; a hook never calls it, except
//! the few entry points of [`control`] (start the thread, step it aside), which are hook-safe.
//! It imports the hook-safe layer and the base modules, and, within this layer:
//!
//! stats, fds → monitor → detector → metrics → report → control.
pub mod control;
pub mod detector;
pub mod fds;
pub mod metrics;
pub mod monitor;
pub mod report;
pub mod stats;
