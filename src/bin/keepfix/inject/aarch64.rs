//! aarch64 registers for `rescue --release`: user_pt_regs through PTRACE_GETREGSET NT_PRSTATUS,
//! the system call number through NT_ARM_SYSTEM_CALL, and `svc #0` (0xd4000001).
//!
//! arm64 prepares a restart *before* the signal code stops the thread (arch/arm64/kernel/signal.c,
//! do_signal): a call interrupted with -ERESTART* shows pc at its `svc` and x0 = orig_x0 already,
//! and its number forgotten (-1). Restoring those registers re-runs the call, as the kernel would.
//! Compiled for aarch64-unknown-linux-gnu; tested on x86_64 only.

use std::io;

/// `svc #0`, little-endian.
pub const SYSCALL_INSN: &[u8] = &[0x01, 0x00, 0x00, 0xd4];
pub const SYSCALL_LEN: u64 = 4;

pub const NR_CLOSE: i64 = 57;
pub const NR_SOCKETPAIR: i64 = 199;
pub const NR_DUP3: i64 = 24;

/// As on x86_64 (see there): calls that a stop fails with EINTR and that may be re-run.
pub const EINTR_RERUN: &[i64] = &[
    22,  // epoll_pwait
    63,  // read
    137, // rt_sigtimedwait
    202, // accept
    207, // recvfrom
    212, // recvmsg
    242, // accept4
    441, // epoll_pwait2
];

/// struct user_pt_regs (arch/arm64/include/uapi/asm/ptrace.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct UserPtRegs {
    regs: [u64; 31],
    sp: u64,
    pc: u64,
    pstate: u64,
}

#[derive(Clone, Copy)]
pub struct Regs {
    r: UserPtRegs,
    /// NT_ARM_SYSTEM_CALL: the call the thread is in, -1 for none (or forgotten).
    syscallno: i32,
}

const PTRACE_GETREGSET: u32 = 0x4204;
const PTRACE_SETREGSET: u32 = 0x4205;
const NT_PRSTATUS: usize = 1;
const NT_ARM_SYSTEM_CALL: usize = 0x404;
/// PSTATE.nRW: set for an AArch32 (compat) thread.
const PSR_MODE32_BIT: u64 = 0x10;

fn getregset<T>(tid: i32, note: usize, v: &mut T) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: (v as *mut T).cast(), iov_len: std::mem::size_of::<T>() };
    super::ptrace(PTRACE_GETREGSET, tid, note, (&raw mut iov) as usize).map(drop)
}

fn setregset<T>(tid: i32, note: usize, v: &T) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: (v as *const T).cast_mut().cast(), iov_len: std::mem::size_of::<T>() };
    super::ptrace(PTRACE_SETREGSET, tid, note, (&raw mut iov) as usize).map(drop)
}

pub fn get_regs(tid: i32) -> io::Result<Regs> {
    let mut r = UserPtRegs { regs: [0; 31], sp: 0, pc: 0, pstate: 0 };
    getregset(tid, NT_PRSTATUS, &mut r)?;
    let mut syscallno: i32 = -1;
    getregset(tid, NT_ARM_SYSTEM_CALL, &mut syscallno)?;
    Ok(Regs { r, syscallno })
}

pub fn set_regs(tid: i32, r: &Regs) -> io::Result<()> {
    setregset(tid, NT_PRSTATUS, &r.r)?;
    setregset(tid, NT_ARM_SYSTEM_CALL, &r.syscallno)
}

impl Regs {
    pub fn is_native(&self) -> bool {
        self.r.pstate & PSR_MODE32_BIT == 0
    }
    pub fn pc(&self) -> u64 {
        self.r.pc
    }
    pub fn sp(&self) -> u64 {
        self.r.sp
    }
    /// The call the thread is in. At a stop in the signal code arm64 has already forgotten it;
    /// x8 still holds the number the program asked for.
    pub fn syscall_nr(&self) -> Option<i64> {
        (self.syscallno >= 0).then_some(i64::from(self.syscallno))
    }
    /// x8: the number of the last call made (arm64's kernel does not clobber it).
    pub fn last_nr(&self) -> i64 {
        self.r.regs[8] as i64
    }
    pub fn ret(&self) -> i64 {
        self.r.regs[0] as i64
    }
    pub fn set_ret(&mut self, v: i64) {
        self.r.regs[0] = v as u64;
    }
    pub fn arg(&self, i: usize) -> u64 {
        self.r.regs.get(i).copied().unwrap_or_default()
    }
    pub fn set_pc(&mut self, pc: u64) {
        self.r.pc = pc;
    }
    /// These registers, set to run call `nr(args)` at the `svc` at `insn`; no call in progress, so
    /// that the kernel applies no restart logic to them.
    pub fn call(&self, insn: u64, nr: i64, args: [u64; 6]) -> Regs {
        let mut r = self.r;
        r.pc = insn;
        r.regs[8] = nr as u64;
        r.regs[..6].copy_from_slice(&args);
        Regs { r, syscallno: -1 }
    }
}
