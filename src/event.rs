//! keepfix's event vocabulary: every name and field a log line or metric uses, and how values
//! are written (errno as a name).

/// errno as its name, as every line writes it.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOMEM => "ENOMEM",
        libc::ENOBUFS => "ENOBUFS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENOSYS => "ENOSYS",
        libc::EAGAIN => "EAGAIN",
        _ => "other",
    }
}
