//! Layer 1, hook-safe: everything a hook may touch. Code here is async-signal-safe, never
//! allocates and never takes a lock; it waits for nothing but a bounded spin (the fd table's
//! release protocol, at most fdtable::WAIT_US). It imports only the base modules and, within
//! this layer, the modules listed before it:
//!
//! settings, ring → fdtable → ownfd → log → wake → keepalive → release → emfile.
pub mod emfile;
pub mod fdtable;
pub mod keepalive;
pub mod log;
pub mod ownfd;
pub mod release;
pub mod ring;
pub mod settings;
pub mod wake;
