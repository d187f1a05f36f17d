//! x86_64 registers for `rescue --release`: PTRACE_GETREGS/SETREGS, the `syscall` instruction
//! (0f 05), and the kernel's restart conventions (arch/x86/kernel/signal.c): a call interrupted by a
//! stop has rax = -ERESTART*, orig_rax = its number, and rip just past its `syscall`.

use std::io;

/// `syscall`.
pub const SYSCALL_INSN: &[u8] = &[0x0f, 0x05];
/// A syscall instruction is this long: the one a stopped call used is at pc - SYSCALL_LEN.
pub const SYSCALL_LEN: u64 = 2;

pub const NR_CLOSE: i64 = 3;
pub const NR_SOCKETPAIR: i64 = 53;
pub const NR_DUP3: i64 = 292;

/// Calls that return EINTR, not -ERESTART*, when a stop interrupts them (signal(7): "interruption
/// of system calls by stop signals"), and that may be re-run with the same arguments: the epoll
/// waits, sigtimedwait, and the socket reads and accepts with SO_RCVTIMEO (nothing is consumed when
/// they fail). Not connect (a second connect gives EALREADY) nor close (never re-run a close).
pub const EINTR_RERUN: &[i64] = &[
    0,   // read
    43,  // accept
    45,  // recvfrom
    47,  // recvmsg
    128, // rt_sigtimedwait
    232, // epoll_wait
    281, // epoll_pwait
    288, // accept4
    441, // epoll_pwait2
];

#[derive(Clone, Copy)]
pub struct Regs(libc::user_regs_struct);

const PTRACE_GETREGS: u32 = 12;
const PTRACE_SETREGS: u32 = 13;
/// The user code segment of a 64-bit process; 0x23 is a 32-bit (compat) one.
const USER_CS_64: u64 = 0x33;

pub fn get_regs(tid: i32) -> io::Result<Regs> {
    // SAFETY: all-zero is a valid user_regs_struct; PTRACE_GETREGS fills it.
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    super::ptrace(PTRACE_GETREGS, tid, 0, (&raw mut r) as usize)?;
    Ok(Regs(r))
}

pub fn set_regs(tid: i32, r: &Regs) -> io::Result<()> {
    super::ptrace(PTRACE_SETREGS, tid, 0, (&raw const r.0) as usize).map(drop)
}

impl Regs {
    /// A 64-bit thread (keepfix injects 64-bit calls only).
    pub fn is_native(&self) -> bool {
        self.0.cs == USER_CS_64
    }
    pub fn pc(&self) -> u64 {
        self.0.rip
    }
    pub fn sp(&self) -> u64 {
        self.0.rsp
    }
    /// The call the thread stopped in (orig_rax), if it stopped in one.
    pub fn syscall_nr(&self) -> Option<i64> {
        let nr = self.0.orig_rax as i64;
        (nr >= 0).then_some(nr)
    }
    /// The call's return value, as the kernel left it.
    pub fn ret(&self) -> i64 {
        self.0.rax as i64
    }
    pub fn set_ret(&mut self, v: i64) {
        self.0.rax = v as u64;
    }
    /// These registers, set to run call `nr(args)` at the `syscall` instruction at `insn`. orig_rax
    /// is -1 so that the kernel applies no restart logic to them on the way out.
    pub fn call(&self, insn: u64, nr: i64, args: [u64; 6]) -> Regs {
        let mut r = self.0;
        r.rip = insn;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = args;
        Regs(r)
    }
}
