//! GDT, IDT, the 8259 PIC pair and the 8254 PIT.
//!
//! The guest keeps interrupts disabled except while it halts (`sti; hlt;
//! cli`) and inside the instruction-rate loop, both of which are assembly
//! that keeps nothing below the stack pointer. Interrupt handlers run on the
//! interrupted stack, and the host target's ABI lets compiled code keep data
//! in the 128 bytes below the stack pointer (the red zone); this rule keeps
//! handlers from overwriting it.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::io::{inb, outb};
use super::serial::Serial;
use testguest::fmt::Sink;

/// PIT ticks counted by the timer interrupt handler.
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// PIC IRQ lines (bit n = IRQ n, 1..=15) that interrupted since the main
/// loop last looked; set by the IRQ handlers.
pub static IRQ_PENDING: AtomicU32 = AtomicU32::new(0);

const CODE_SELECTOR: u64 = 0x08;

/// null; 0x08: 64-bit code; 0x10: data. The same layout twinvm's GDT has, so
/// the selectors already loaded stay valid. Accessed bits are preset so the
/// CPU never writes to the table.
static GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Vectors 0-31: CPU exceptions; 32-47: the remapped PIC IRQs.
const IDT_ENTRIES: usize = 48;
const PIC_MASTER_VECTOR: u8 = 0x20;
const PIC_SLAVE_VECTOR: u8 = 0x28;

/// The IDT: 16-byte gates, filled in by [`init`].
static mut IDT: [[u64; 2]; IDT_ENTRIES] = [[0; 2]; IDT_ENTRIES];

const PIC_MASTER_CMD: u16 = 0x20;
const PIC_MASTER_DATA: u16 = 0x21;
const PIC_SLAVE_CMD: u16 = 0xa0;
const PIC_SLAVE_DATA: u16 = 0xa1;
const PIC_EOI: u8 = 0x20;

const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
/// 1193182 Hz / 11932 = 100 Hz.
const PIT_DIVISOR: u16 = 11932;

/// Operand of `lgdt`/`lidt`.
#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

unsafe extern "C" {
    /// 32 exception entry stubs, 16 bytes apart (below).
    static exception_stubs: u8;
    fn tick_isr();
    /// Addresses of the handlers of IRQ 1..=15, in order (below).
    static irq_stub_table: [u64; 15];
}

// Exception stubs push a zero error code when the CPU does not push one, then
// the vector, and join `exception_common`, which saves the registers and
// calls `exception` (which does not return).
//
// The timer handler counts the tick and acknowledges it. The handler of
// IRQ n (1..=15) sets bit n of IRQ_PENDING and acknowledges it (IRQs of
// virtio devices; the others are masked, so only spurious IRQ 7 and 15 can
// arrive, which at worst cause an extra poll).
global_asm!(
    ".pushsection .text.isr, \"ax\"",
    ".macro twinvm_exception_stub vec, has_error",
    "    .balign 16",
    "    .if \\has_error == 0",
    "    push 0",
    "    .endif",
    "    push \\vec",
    "    jmp exception_common",
    ".endm",
    ".balign 16",
    ".global exception_stubs",
    "exception_stubs:",
    "twinvm_exception_stub 0, 0",
    "twinvm_exception_stub 1, 0",
    "twinvm_exception_stub 2, 0",
    "twinvm_exception_stub 3, 0",
    "twinvm_exception_stub 4, 0",
    "twinvm_exception_stub 5, 0",
    "twinvm_exception_stub 6, 0",
    "twinvm_exception_stub 7, 0",
    "twinvm_exception_stub 8, 1",
    "twinvm_exception_stub 9, 0",
    "twinvm_exception_stub 10, 1",
    "twinvm_exception_stub 11, 1",
    "twinvm_exception_stub 12, 1",
    "twinvm_exception_stub 13, 1",
    "twinvm_exception_stub 14, 1",
    "twinvm_exception_stub 15, 0",
    "twinvm_exception_stub 16, 0",
    "twinvm_exception_stub 17, 1",
    "twinvm_exception_stub 18, 0",
    "twinvm_exception_stub 19, 0",
    "twinvm_exception_stub 20, 0",
    "twinvm_exception_stub 21, 1",
    "twinvm_exception_stub 22, 0",
    "twinvm_exception_stub 23, 0",
    "twinvm_exception_stub 24, 0",
    "twinvm_exception_stub 25, 0",
    "twinvm_exception_stub 26, 0",
    "twinvm_exception_stub 27, 0",
    "twinvm_exception_stub 28, 0",
    "twinvm_exception_stub 29, 1",
    "twinvm_exception_stub 30, 1",
    "twinvm_exception_stub 31, 0",
    ".purgem twinvm_exception_stub",
    "exception_common:",
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {exception}",
    "3:  cli",
    "    hlt",
    "    jmp 3b",
    "",
    ".global tick_isr",
    "tick_isr:",
    "    push rax",
    "    inc qword ptr [rip + {ticks}]",
    "    mov al, {eoi}",
    "    out {master}, al",
    "    pop rax",
    "    iretq",
    "",
    ".macro twinvm_irq_stub irq",
    "    .balign 16",
    "irq_stub_\\irq:",
    "    push rax",
    "    or dword ptr [rip + {pending}], 1 << \\irq",
    "    mov al, {eoi}",
    "    .if \\irq >= 8",
    "    out {slave}, al",
    "    .endif",
    "    out {master}, al",
    "    pop rax",
    "    iretq",
    ".endm",
    "twinvm_irq_stub 1",
    "twinvm_irq_stub 2",
    "twinvm_irq_stub 3",
    "twinvm_irq_stub 4",
    "twinvm_irq_stub 5",
    "twinvm_irq_stub 6",
    "twinvm_irq_stub 7",
    "twinvm_irq_stub 8",
    "twinvm_irq_stub 9",
    "twinvm_irq_stub 10",
    "twinvm_irq_stub 11",
    "twinvm_irq_stub 12",
    "twinvm_irq_stub 13",
    "twinvm_irq_stub 14",
    "twinvm_irq_stub 15",
    ".purgem twinvm_irq_stub",
    ".pushsection .rodata.irq_stub_table, \"a\"",
    ".balign 8",
    ".global irq_stub_table",
    "irq_stub_table:",
    ".quad irq_stub_1, irq_stub_2, irq_stub_3, irq_stub_4, irq_stub_5",
    ".quad irq_stub_6, irq_stub_7, irq_stub_8, irq_stub_9, irq_stub_10",
    ".quad irq_stub_11, irq_stub_12, irq_stub_13, irq_stub_14, irq_stub_15",
    ".popsection",
    ".popsection",
    exception = sym exception,
    ticks = sym TICKS,
    pending = sym IRQ_PENDING,
    eoi = const PIC_EOI,
    master = const PIC_MASTER_CMD,
    slave = const PIC_SLAVE_CMD,
);

/// Registers saved by `exception_common`, lowest address first.
#[repr(C)]
struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Reports a CPU exception and panics.
extern "C" fn exception(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let out = &mut Serial;
    out.put_str("exception vector=");
    out.put_u64(frame.vector);
    out.put_str(" error=");
    out.put_hex(frame.error_code);
    out.put_str(" rip=");
    out.put_hex(frame.rip);
    out.put_str(" rsp=");
    out.put_hex(frame.rsp);
    out.put_str(" rflags=");
    out.put_hex(frame.rflags);
    out.put_str(" cr2=");
    out.put_hex(cr2);
    out.put(b'\n');
    for (name, value) in [
        ("rax", frame.rax),
        ("rbx", frame.rbx),
        ("rcx", frame.rcx),
        ("rdx", frame.rdx),
        ("rsi", frame.rsi),
        ("rdi", frame.rdi),
        ("rbp", frame.rbp),
        ("r8", frame.r8),
        ("r9", frame.r9),
        ("r10", frame.r10),
        ("r11", frame.r11),
        ("r12", frame.r12),
        ("r13", frame.r13),
        ("r14", frame.r14),
        ("r15", frame.r15),
    ] {
        out.put_str(name);
        out.put(b'=');
        out.put_hex(value);
        out.put(b' ');
    }
    out.put_str("cs=");
    out.put_hex(frame.cs);
    out.put_str(" ss=");
    out.put_hex(frame.ss);
    out.put(b'\n');
    panic!("CPU exception");
}

fn isr_address(isr: unsafe extern "C" fn()) -> u64 {
    isr as usize as u64
}

/// An interrupt gate (present, DPL 0, 64-bit) to `handler`.
fn gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (CODE_SELECTOR << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Loads the guest's GDT and IDT. Interrupts stay disabled.
pub fn init() {
    let stubs = &raw const exception_stubs as u64;
    // SAFETY: a table of 15 addresses in read-only data (above).
    let irq_stubs = unsafe { irq_stub_table };
    let idt = &raw mut IDT;
    for vector in 0..IDT_ENTRIES {
        let handler = match vector {
            0..32 => stubs + 16 * vector as u64,
            0x20 => isr_address(tick_isr),
            _ => irq_stubs[vector - 0x21],
        };
        // SAFETY: single-threaded, interrupts off, and the IDT is not yet
        // loaded: nothing else accesses it; vector is in bounds.
        unsafe { (*idt)[vector] = gate(handler) };
    }
    let gdtr = TablePointer {
        limit: (core::mem::size_of_val(&GDT) - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    let idtr = TablePointer {
        limit: (IDT_ENTRIES * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the GDT keeps the selectors twinvm loaded (0x08 code, 0x10
    // data) meaning the same thing; every IDT gate points at a handler above
    // and both tables are statics that live forever.
    unsafe {
        asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack, preserves_flags));
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Remaps the PICs to vectors 0x20-0x2f with every IRQ but the timer masked,
/// and starts the PIT at 100 Hz. Interrupts stay disabled (ticks are taken
/// by [`wait_for_interrupt`]).
pub fn start_timer() {
    // SAFETY: standard 8259 initialization and 8254 programming; these
    // devices belong to this guest alone.
    unsafe {
        outb(PIC_MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4 follows
        outb(PIC_SLAVE_CMD, 0x11);
        outb(PIC_MASTER_DATA, PIC_MASTER_VECTOR); // ICW2: vector base
        outb(PIC_SLAVE_DATA, PIC_SLAVE_VECTOR);
        outb(PIC_MASTER_DATA, 0x04); // ICW3: slave on IRQ 2
        outb(PIC_SLAVE_DATA, 0x02); // ICW3: cascade identity
        outb(PIC_MASTER_DATA, 0x01); // ICW4: 8086 mode
        outb(PIC_SLAVE_DATA, 0x01);
        outb(PIC_MASTER_DATA, 0xfe); // only IRQ 0 (timer)
        outb(PIC_SLAVE_DATA, 0xff);

        outb(PIT_COMMAND, 0x34); // channel 0, lobyte/hibyte, mode 2
        outb(PIT_CHANNEL0, PIT_DIVISOR as u8);
        outb(PIT_CHANNEL0, (PIT_DIVISOR >> 8) as u8);
    }
}

/// Unmasks PIC line `irq` (1..=15; a line on the slave PIC also unmasks
/// the cascade).
pub fn unmask_irq(irq: u8) {
    // SAFETY: reading and writing the PIC mask registers only changes which
    // IRQs are delivered; each line has a handler.
    unsafe {
        if irq < 8 {
            let mask = inb(PIC_MASTER_DATA);
            outb(PIC_MASTER_DATA, mask & !(1 << irq));
        } else if irq < 16 {
            let mask = inb(PIC_SLAVE_DATA);
            outb(PIC_SLAVE_DATA, mask & !(1 << (irq - 8)));
            let mask = inb(PIC_MASTER_DATA);
            outb(PIC_MASTER_DATA, mask & !(1 << 2));
        }
    }
}

/// Takes the set of IRQ lines that interrupted since the last call (bit n
/// = IRQ n). Called with interrupts disabled, like all of the main loop.
pub fn take_irqs() -> u32 {
    let pending = IRQ_PENDING.load(Ordering::Relaxed);
    if pending != 0 {
        IRQ_PENDING.store(0, Ordering::Relaxed);
    }
    pending
}

/// Whether an IRQ handler ran since the last [`take_irqs`].
pub fn irqs_pending() -> bool {
    IRQ_PENDING.load(Ordering::Relaxed) != 0
}

/// Ticks counted so far.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Halts until an interrupt has been handled. Interrupts are enabled only
/// for the halt: `sti` delays them by one instruction, so one that is
/// already pending wakes the `hlt` rather than being taken before it.
pub fn wait_for_interrupt() {
    // SAFETY: the handlers preserve every register and the red zone is not
    // in use across an asm block that may use the stack; memory is clobbered
    // (the handler updates TICKS).
    unsafe { asm!("sti", "hlt", "cli") };
}

/// Stops the vCPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, hlt never returns (short of an NMI,
        // after which the loop halts again).
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Runs a loop of known instruction count (see `testguest::ips`) until
/// `ticks` timer ticks have passed, starting on a tick. Returns the number of
/// outer iterations and the ticks that actually elapsed.
pub fn run_ips_loop(ticks_to_run: u64) -> (u64, u64) {
    let start_seen = ticks();
    while ticks() == start_seen {
        wait_for_interrupt();
    }
    let start = ticks();
    let end = start + ticks_to_run;
    let mut outer: u64 = 0;
    // SAFETY: pure register arithmetic plus reads of TICKS; interrupts are
    // enabled only inside the loop and its handler preserves all registers.
    unsafe {
        asm!(
            "sti",
            "2:",
            "mov ecx, {inner}",
            "3:",
            "dec rcx",
            "jnz 3b",
            "inc {outer}",
            "cmp qword ptr [rip + {ticks}], {end}",
            "jb 2b",
            "cli",
            inner = const testguest::ips::INNER_ITERATIONS,
            outer = inout(reg) outer,
            end = in(reg) end,
            ticks = sym TICKS,
            out("rcx") _,
        );
    }
    (outer, ticks() - start)
}
