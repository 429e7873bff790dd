//! Builds the test guest (`testguest/` at the repository root) and tells the
//! crate where its ELF is: `env!("TWINVM_TESTGUEST_ELF")`.
//!
//! The guest is its own Cargo workspace with its own flags
//! (`testguest/.cargo/config.toml`), profile and linker script, so it is built
//! by a nested `cargo build --release` run from that directory, into a target
//! directory under `OUT_DIR`. The environment Cargo gives build scripts is
//! cleaned first: flags and settings meant for this crate (RUSTFLAGS,
//! wrappers such as clippy-driver, profile overrides, the target directory)
//! must not leak into the freestanding guest build.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables removed from the nested build's environment: exact names.
const REMOVED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_INCREMENTAL",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_DIR",
];

/// Variables removed from the nested build's environment: name prefixes.
/// `CARGO_BUILD_*`, `CARGO_TARGET_*` and `CARGO_PROFILE_*` override config
/// and profile settings; `__CARGO*` are Cargo's internal hand-offs;
/// `CLIPPY_*` carries clippy's arguments.
const REMOVED_PREFIXES: &[&str] = &[
    "CARGO_BUILD_",
    "CARGO_TARGET_",
    "CARGO_PROFILE_",
    "__CARGO",
    "CLIPPY_",
];

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir.join("../../testguest");
    let guest_dir = guest_dir
        .canonicalize()
        .unwrap_or_else(|e| panic!("test guest directory {}: {e}", guest_dir.display()));
    let target_dir = PathBuf::from(env("OUT_DIR")).join("testguest-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }

    let mut command = Command::new(&cargo);
    command
        .current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--color",
            "never",
            "--target-dir",
        ])
        .arg(&target_dir);
    for (name, _) in std::env::vars_os() {
        if should_remove(&name) {
            command.env_remove(&name);
        }
    }

    let output = command.output().unwrap_or_else(|e| {
        panic!(
            "running {} for the test guest: {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        eprintln!("--- test guest build (in {}) ---", guest_dir.display());
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("error: building the test guest failed ({})", output.status);
        std::process::exit(1);
    }

    let elf = target_dir.join("release").join("testguest");
    if !elf.is_file() {
        panic!(
            "the test guest build succeeded but {} is missing",
            elf.display()
        );
    }
    println!("cargo:rustc-env=TWINVM_TESTGUEST_ELF={}", elf.display());
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (not run by Cargo?)"))
}

fn should_remove(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    REMOVED_VARS.contains(&name) || REMOVED_PREFIXES.iter().any(|p| name.starts_with(p))
}
