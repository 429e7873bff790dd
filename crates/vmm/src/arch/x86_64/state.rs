//! Capture and load of the machine state KVM holds: each vCPU's registers
//! and the VM-wide in-kernel devices (PIC, IOAPIC, PIT) and clock.
//!
//! State loads into an existing VM whose vCPUs are paused — the same VM
//! objects, many times over — as well as into a freshly built one.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, Msrs,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors of state capture and load; the name says which piece failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM get/set call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM read or wrote fewer MSRs than asked.
    #[error("KVM {verb} {done} of {total} MSRs")]
    PartialMsrs {
        /// "read" or "wrote".
        verb: &'static str,
        /// MSRs handled.
        done: usize,
        /// MSRs asked for.
        total: usize,
    },
    /// The state has a list too long for KVM's structures.
    #[error("invalid {0} list in the saved state")]
    BadList(&'static str),
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// CPUID as set for this vCPU.
    #[serde(with = "crate::snapshot::codec::kvm_seq")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI...
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub xsave: kvm_xsave,
    /// Extended control registers.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets the VMM read for this vCPU.
    #[serde(with = "crate::snapshot::codec::kvm_seq")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub events: kvm_vcpu_events,
}

/// The MSRs of `candidates` that KVM can read on `vcpu` (some listed MSRs
/// exist only with CPU features the host or guest lacks).
pub fn readable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    candidates
        .iter()
        .copied()
        .filter(|&index| {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            Msrs::from_entries(&[entry])
                .ok()
                .and_then(|mut msrs| vcpu.get_msrs(&mut msrs).ok())
                == Some(1)
        })
        .collect()
}

/// Reads the vCPU's state. The vCPU must not be running.
///
/// The order follows what each piece depends on: CPUID first (it shapes
/// what the others mean); MP state; registers and special registers; FPU
/// state; the local APIC after the special registers (its base lives in
/// them); MSRs; and the vCPU events last, so that an exception or interrupt
/// KVM queued while the others were read is included.
pub fn save_vcpu(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuSnapshot, StateError> {
    let err = |what| move |e| StateError::Kvm(what, e);
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("read the vCPU's CPUID"))?
        .as_slice()
        .to_vec();
    let mp_state = vcpu.get_mp_state().map_err(err("read the MP state"))?;
    let regs = vcpu.get_regs().map_err(err("read the registers"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(err("read the special registers"))?;
    let xsave = vcpu.get_xsave().map_err(err("read the XSAVE state"))?;
    let xcrs = vcpu.get_xcrs().map_err(err("read the XCRs"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(err("read the debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(err("read the local APIC"))?;
    let msrs = {
        let entries: Vec<kvm_msr_entry> = msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut wrapper = Msrs::from_entries(&entries).map_err(|_| StateError::BadList("MSR"))?;
        let done = vcpu.get_msrs(&mut wrapper).map_err(err("read the MSRs"))?;
        if done != entries.len() {
            return Err(StateError::PartialMsrs {
                verb: "read",
                done,
                total: entries.len(),
            });
        }
        wrapper.as_slice().to_vec()
    };
    let events = vcpu
        .get_vcpu_events()
        .map_err(err("read the vCPU events"))?;
    Ok(VcpuSnapshot {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Writes a saved state into the vCPU. The vCPU must not be running.
///
/// CPUID first (KVM accepts it again after the vCPU has run only if it is
/// unchanged, which holds for a state of the same VM); the MP state; the
/// registers; the special registers before the local APIC, because setting
/// the APIC base through them resets the APIC; FPU state; MSRs after the
/// local APIC, because the TSC-deadline MSR programs the APIC timer; the
/// vCPU events last, because pending exceptions and interrupts are only
/// meaningful on top of the rest.
pub fn load_vcpu(vcpu: &VcpuFd, s: &VcpuSnapshot) -> Result<(), StateError> {
    let err = |what| move |e| StateError::Kvm(what, e);
    let cpuid =
        kvm_bindings::CpuId::from_entries(&s.cpuid).map_err(|_| StateError::BadList("CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(err("set the vCPU's CPUID"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(err("set the MP state"))?;
    vcpu.set_regs(&s.regs).map_err(err("set the registers"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(err("set the special registers"))?;
    // SAFETY: the buffer is a kvm_xsave read from KVM for a vCPU of the same
    // CPUID; KVM validates its contents and the ioctl only reads it.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(err("set the XSAVE state"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(err("set the XCRs"))?;
    vcpu.set_debug_regs(&s.debug_regs)
        .map_err(err("set the debug registers"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(err("set the local APIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| StateError::BadList("MSR"))?;
    let done = vcpu.set_msrs(&msrs).map_err(err("set the MSRs"))?;
    if done != s.msrs.len() {
        return Err(StateError::PartialMsrs {
            verb: "wrote",
            done,
            total: s.msrs.len(),
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(err("set the vCPU events"))?;
    Ok(())
}

/// The VM-wide state KVM holds: the in-kernel PIC pair, IOAPIC, PIT and the
/// guest clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmArchSnapshot {
    /// kvmclock.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub clock: kvm_clock_data,
    /// The 8254 PIT.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub pit: kvm_pit_state2,
    /// The master 8259 PIC.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    #[serde(with = "crate::snapshot::codec::kvm")]
    pub ioapic: kvm_irqchip,
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| StateError::Kvm(what, e))?;
    Ok(chip)
}

/// Reads the VM-wide state. Every vCPU must be paused.
pub fn save_vm(vm: &VmFd) -> Result<VmArchSnapshot, StateError> {
    let clock = vm
        .get_clock()
        .map_err(|e| StateError::Kvm("read the guest clock", e))?;
    let pit = vm
        .get_pit2()
        .map_err(|e| StateError::Kvm("read the PIT", e))?;
    Ok(VmArchSnapshot {
        clock,
        pit,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "read the master PIC")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "read the slave PIC")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "read the IOAPIC")?,
    })
}

/// Writes the VM-wide state. Every vCPU must be paused; load the vCPUs
/// afterwards (their local APICs take interrupts from these chips).
///
/// The clock first, then the PICs and the IOAPIC, the PIT last. The
/// in-kernel PIT keeps ticking while the vCPUs are paused, and in its
/// default re-inject mode it raises its next tick only after the guest
/// acknowledged the previous one. Setting the PIT resets that bookkeeping;
/// a tick raised after it but before the PICs were set would be wiped from
/// the PIC while the PIT still waited for its acknowledgement — and the
/// guest's timer would stop for good. With the PIT set last, a tick raised
/// between the two lands in the loaded PIC (at worst one tick early), and
/// every later one too.
pub fn load_vm(vm: &VmFd, s: &VmArchSnapshot) -> Result<(), StateError> {
    // Only the time itself is restored; the flags KVM reported describe how
    // it was read, not something to set.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| StateError::Kvm("set the guest clock", e))?;
    for (chip, what) in [
        (&s.pic_master, "set the master PIC"),
        (&s.pic_slave, "set the slave PIC"),
        (&s.ioapic, "set the IOAPIC"),
    ] {
        vm.set_irqchip(chip).map_err(|e| StateError::Kvm(what, e))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| StateError::Kvm("set the PIT", e))?;
    Ok(())
}
