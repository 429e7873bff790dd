//! The memory functions the compiler calls (`memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp`); there is no libc. Written with string instructions,
//! which KVM's instruction emulator handles, and which the compiler cannot
//! turn back into calls to themselves.

use core::arch::asm;

/// # Safety
/// `dest` and `src` valid for `n` bytes and not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; DF is clear (cld at entry
    // and the ABI requires it on calls).
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap: a forward copy is correct.
        // SAFETY: as for memcpy; forward copying never reads a byte already
        // overwritten when dest is below src or the ranges are disjoint.
        unsafe { memcpy(dest, src, n) }
    } else {
        // dest lies inside [src, src + n): copy backwards.
        // SAFETY: the caller guarantees both ranges; DF is restored to clear
        // before returning, as the ABI requires.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                inout("rcx") n => _,
                options(nostack),
            );
        }
        dest
    }
}

/// # Safety
/// `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") value as u8, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees both ranges; volatile reads
        // keep the compiler from turning this loop into a memcmp call.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
