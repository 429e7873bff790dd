//! The entry point. twinvm jumps to `_start` in 64-bit mode with interrupts
//! off, paging on (identity map) and RSI pointing at `boot_params`.

use core::arch::global_asm;

// Switch to the guest's own stack (in the image, see link.ld), zero .bss,
// then call `kmain(boot_params)`, which never returns.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    cli",
    "    cld",
    "    mov rsp, offset __stack_top",
    "    mov rbx, rsi",
    "    mov rdi, offset __bss_start",
    "    mov rcx, offset __bss_end",
    "    sub rcx, rdi",
    "    shr rcx, 3",
    "    xor eax, eax",
    "    rep stosq",
    "    mov rdi, rbx",
    "    call {kmain}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    kmain = sym crate::kmain,
);
