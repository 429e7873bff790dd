//! x86_64 boot: the guest-physical layout of boot structures, vCPU register
//! state at entry, CPUID, MSRs and the boot parameters a kernel reads.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod state;
