//! Checks the built test guest image (`testguest/`, embedded by build.rs):
//! an ELF64 x86_64 executable linked at 1 MiB, free of instructions that
//! KVM's instruction emulator rejects on hosts without VT-x/AMD-V.

use std::path::Path;
use std::process::Command;

const GUEST_ELF: &str = env!("TWINVM_TESTGUEST_ELF");

/// Lowest address the guest may be loaded at.
const LOAD_BASE: u64 = 0x10_0000;
/// Upper bound on the memory the image uses (code, data, bss, stack).
const MAX_IMAGE_BYTES: u64 = 1 << 20;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;

/// A program header, the fields these checks need.
#[derive(Debug)]
struct Segment {
    kind: u32,
    flags: u32,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

struct Elf {
    elf_type: u16,
    machine: u16,
    entry: u64,
    segments: Vec<Segment>,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parses the ELF64 little-endian header and program headers.
fn parse_elf(b: &[u8]) -> Result<Elf, String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(format!(
            "not ELF64 little-endian (class {}, data {})",
            b[4], b[5]
        ));
    }
    let phoff = usize::try_from(read_u64(b, 32)).map_err(|e| e.to_string())?;
    let phentsize = usize::from(read_u16(b, 54));
    let phnum = usize::from(read_u16(b, 56));
    if phentsize < 56 || phoff + phnum * phentsize > b.len() {
        return Err("program headers out of bounds".into());
    }
    let segments = (0..phnum)
        .map(|i| {
            let at = phoff + i * phentsize;
            Segment {
                kind: read_u32(b, at),
                flags: read_u32(b, at + 4),
                vaddr: read_u64(b, at + 16),
                paddr: read_u64(b, at + 24),
                filesz: read_u64(b, at + 32),
                memsz: read_u64(b, at + 40),
            }
        })
        .collect();
    Ok(Elf {
        elf_type: read_u16(b, 16),
        machine: read_u16(b, 18),
        entry: read_u64(b, 24),
        segments,
    })
}

#[test]
fn guest_is_an_x86_64_executable_linked_at_1mib() {
    let bytes = std::fs::read(GUEST_ELF).unwrap_or_else(|e| panic!("reading {GUEST_ELF}: {e}"));
    let elf = parse_elf(&bytes).unwrap_or_else(|e| panic!("{GUEST_ELF}: {e}"));
    assert_eq!(elf.elf_type, 2, "ELF type must be ET_EXEC");
    assert_eq!(elf.machine, 0x3e, "ELF machine must be x86_64");

    let loads: Vec<&Segment> = elf.segments.iter().filter(|s| s.kind == PT_LOAD).collect();
    assert!(!loads.is_empty(), "no PT_LOAD segment");
    for s in &elf.segments {
        assert!(
            s.kind != PT_INTERP && s.kind != PT_DYNAMIC,
            "the guest must be static: {s:?}"
        );
    }
    let mut end = 0;
    for s in &loads {
        assert!(s.paddr >= LOAD_BASE, "PT_LOAD below 1 MiB: {s:?}");
        assert_eq!(
            s.vaddr, s.paddr,
            "virtual and physical addresses differ: {s:?}"
        );
        assert!(s.filesz <= s.memsz, "filesz > memsz: {s:?}");
        end = end.max(s.paddr + s.memsz);
    }
    let start = loads.iter().map(|s| s.paddr).min().unwrap();
    assert!(
        end - start <= MAX_IMAGE_BYTES,
        "image spans {} bytes, more than {MAX_IMAGE_BYTES}",
        end - start
    );
    assert!(
        loads
            .iter()
            .any(|s| s.flags & PF_X != 0 && (s.paddr..s.paddr + s.memsz).contains(&elf.entry)),
        "entry point {:#x} is not in an executable PT_LOAD segment",
        elf.entry
    );
}

#[test]
fn guest_has_no_instructions_the_emulator_rejects() {
    let disassembly = disassemble(Path::new(GUEST_ELF));
    let instructions = disassembly
        .lines()
        .filter(|l| instruction_text(l).is_some())
        .count();
    assert!(
        instructions > 100,
        "objdump found only {instructions} instructions in {GUEST_ELF}"
    );
    let bad = forbidden_lines(&disassembly);
    assert!(
        bad.is_empty(),
        "{GUEST_ELF} contains instructions KVM's emulator rejects (or vector registers):\n{}",
        bad.iter()
            .map(|(line, why)| format!("  {why}: {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `objdump -d` of the file (Intel syntax, no raw bytes).
fn disassemble(path: &Path) -> String {
    let output = match Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", "-M", "intel"])
        .arg(path)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "objdump is not installed; this test needs it to check the test guest \
             (Debian: apt-get install binutils)"
        ),
        Err(e) => panic!("running objdump: {e}"),
    };
    assert!(
        output.status.success(),
        "objdump -d {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("objdump output is UTF-8")
}

/// The instruction text of an objdump line (`  100000:\tcli` gives `cli`),
/// or `None` for headers, labels and blank lines.
fn instruction_text(line: &str) -> Option<&str> {
    let (address, rest) = line.split_once(':')?;
    let address = address.trim();
    if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // With raw bytes shown, the instruction follows a second tab.
    let rest = rest.strip_prefix('\t')?;
    let text = match rest.split_once('\t') {
        Some((bytes, text)) if is_hex_bytes(bytes) => text,
        _ => rest,
    };
    let text = text.trim();
    (!text.is_empty() && !is_hex_bytes(text)).then_some(text)
}

fn is_hex_bytes(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && s.split(' ')
            .all(|b| b.is_empty() || (b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit())))
}

/// Prefixes objdump prints before a mnemonic.
const PREFIXES: &[&str] = &[
    "rep", "repe", "repz", "repne", "repnz", "lock", "data16", "data32", "addr32", "cs", "ds",
    "es", "ss", "fs", "gs", "notrack", "bnd", "rex", "rex.w", "rex.wb", "rex.wr", "rex.wrb",
    "rex.b", "rex.r", "rex.x",
];

/// Why an instruction (objdump text, Intel or AT&T syntax) must not be in the
/// guest, or `None` if it is fine.
fn forbidden(text: &str) -> Option<&'static str> {
    if text.contains("(bad)") {
        return Some("undecodable bytes");
    }
    let mnemonic = text
        .split_whitespace()
        .find(|w| !PREFIXES.contains(&w.to_ascii_lowercase().as_str()))
        .unwrap_or("")
        .to_ascii_lowercase();
    if mnemonic == "int3" {
        return Some("int3");
    }
    if mnemonic.starts_with("cmpxchg16b") {
        return Some("cmpxchg16b");
    }
    if mnemonic.starts_with("xsave") || mnemonic.starts_with("xrstor") {
        return Some("xsave/xrstor");
    }
    if mnemonic.starts_with("rdrand") || mnemonic.starts_with("rdseed") {
        return Some("rdrand/rdseed");
    }
    if uses_vector_register(text) {
        return Some("vector register");
    }
    None
}

/// Whether `text` names an xmm/ymm/zmm register.
fn uses_vector_register(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["xmm", "ymm", "zmm"].iter().any(|reg| {
        lower.match_indices(reg).any(|(at, _)| {
            let before_ok = at == 0 || !lower.as_bytes()[at - 1].is_ascii_alphanumeric();
            let after_ok = lower.as_bytes().get(at + 3).is_some_and(u8::is_ascii_digit);
            before_ok && after_ok
        })
    })
}

/// The offending lines of an objdump disassembly, with the reason.
fn forbidden_lines(disassembly: &str) -> Vec<(&str, &'static str)> {
    disassembly
        .lines()
        .filter_map(|line| {
            let text = instruction_text(line)?;
            forbidden(text).map(|why| (line.trim(), why))
        })
        .collect()
}

#[test]
fn instruction_text_of_objdump_lines() {
    assert_eq!(instruction_text("  100000:\tcli"), Some("cli"));
    assert_eq!(
        instruction_text("  10001a:\tmov    rdi,rbx"),
        Some("mov    rdi,rbx")
    );
    assert_eq!(
        instruction_text("  100000:\tfa                   \tcli    "),
        Some("cli")
    );
    // A continuation line of raw bytes (long instruction, bytes shown).
    assert_eq!(instruction_text("  100007:\t00 00 "), None);
    assert_eq!(instruction_text("0000000000100000 <_start>:"), None);
    assert_eq!(instruction_text("Disassembly of section .text:"), None);
    assert_eq!(
        instruction_text("/path/testguest:     file format elf64-x86-64"),
        None
    );
    assert_eq!(instruction_text(""), None);
}

#[test]
fn forbidden_instructions_are_found() {
    let sample = "\
/x/testguest:     file format elf64-x86-64


Disassembly of section .text:

0000000000100000 <_start>:
  100000:\tcli
  100001:\tint3
  100002:\tlock cmpxchg16b OWORD PTR [rdi]
  100007:\txsave  [rsp]
  10000b:\txsaveopt64 [rsp]
  10000f:\txrstor [rsp]
  100013:\trdrand rax
  100017:\trdseed eax
  10001b:\tmovups XMMWORD PTR [rsp],xmm0
  10001f:\tvmovdqu ymm1,YMMWORD PTR [rax]
  100023:\tvpxord zmm31,zmm31,zmm31
  100029:\tmovaps %xmm15,(%rsp)
  10002d:\t(bad)
  10002e:\tcc                   \tint3   
  10002f:\tmov    rax,QWORD PTR [rip+0x10]
  100036:\tcall   100100 <xmm_helper>
  10003b:\tmovabs rax,0x786d6d30
  100045:\trep stos QWORD PTR es:[rdi],rax
  100048:\tcmpxchg QWORD PTR [rdi],rsi
  10004d:\tfxsave [rsp]
";
    let bad = forbidden_lines(sample);
    let whys: Vec<&str> = bad.iter().map(|(_, why)| *why).collect();
    assert_eq!(
        whys,
        vec![
            "int3",
            "cmpxchg16b",
            "xsave/xrstor",
            "xsave/xrstor",
            "xsave/xrstor",
            "rdrand/rdseed",
            "rdrand/rdseed",
            "vector register",
            "vector register",
            "vector register",
            "vector register",
            "undecodable bytes",
            "int3",
        ]
    );
    assert_eq!(bad[0].0, "100001:\tint3");
}

#[test]
fn clean_sample_passes() {
    let sample = "\
0000000000100000 <_start>:
  100000:\tcli
  100001:\tmov    rsp,0x114360
  100008:\tcall   100100 <kmain>
  10000d:\tnop    DWORD PTR [rax+rax*1+0x0]
  100015:\tdata16 cs nop WORD PTR [rax+rax*1+0x0]
  100020:\tiretq
";
    assert!(forbidden_lines(sample).is_empty());
}

#[test]
fn elf_parser_rejects_garbage() {
    assert!(parse_elf(b"").is_err());
    assert!(parse_elf(&[0u8; 64]).is_err());
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 1; // ELF32
    header[5] = 1;
    assert!(parse_elf(&header).is_err());
    header[4] = 2;
    header[32..40].copy_from_slice(&1000u64.to_le_bytes()); // phoff past the end
    header[54..56].copy_from_slice(&56u16.to_le_bytes());
    header[56..58].copy_from_slice(&1u16.to_le_bytes());
    assert!(parse_elf(&header).is_err());
}
