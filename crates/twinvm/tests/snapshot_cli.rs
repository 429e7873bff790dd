//! Snapshots from the command line: `twinvm ctl snapshot --to DIR` on a
//! running and on a paused VM, and `twinvm run --restore DIR`, which
//! continues the test guest exactly where it was; restores that cannot
//! work (another memory size or vCPU count, a corrupt state file, no
//! snapshot) end with one error line.
//!
//! The test guest has no wall clock: its clock is the PIT-driven tick
//! counter it prints every 100 ticks (`counter=<n>`). The counter going on
//! from the last value printed before the snapshot — neither starting over
//! nor repeating a value — is what shows that the guest's clock has not
//! gone back.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::{
    BANNER, TempDir, Twinvm, counter_of, is_counter, kvm_available, path_str, run_command_to_exit,
    run_to_exit, twinvm_bin,
};

const T: Duration = Duration::from_secs(60);
const MEMORY: &str = "64M";

/// `twinvm ctl --socket SOCKET ARGS...`, run in `cwd`.
fn ctl_in(cwd: &Path, socket: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(twinvm_bin());
    cmd.current_dir(cwd)
        .env_remove("TWINVM_LOG")
        .args(["ctl", "--socket", path_str(socket)])
        .args(args);
    run_command_to_exit(cmd, T)
}

/// `twinvm ctl ARGS...` (in `cwd`), which must succeed; returns its stdout.
fn ctl_ok(vm: &Twinvm, cwd: &Path, socket: &Path, args: &[&str]) -> String {
    let (status, stdout, stderr) = ctl_in(cwd, socket, args);
    assert!(
        status.success(),
        "ctl {args:?}: {status}\nstdout: {stdout}\nstderr: {stderr}\n{}",
        vm.transcript()
    );
    stdout
}

/// The VM's `state` from `twinvm ctl status`.
fn state(vm: &Twinvm, cwd: &Path, socket: &Path) -> String {
    let out = ctl_ok(vm, cwd, socket, &["status"]);
    let json: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
    json["state"].as_str().expect("state").to_string()
}

/// Boots the test guest with an API socket in `dir`; returns it, the
/// socket and the second counter it printed, once it has printed that.
fn boot(dir: &Path) -> (Twinvm, std::path::PathBuf, u64) {
    let socket = dir.join("api.sock");
    let mut vm = Twinvm::spawn(&["run", "--memory", MEMORY, "--api-socket", path_str(&socket)]);
    vm.wait_for_line(|l| l == BANNER, T).unwrap();
    vm.wait_for_line(is_counter, T).unwrap();
    let second = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    (vm, socket, second)
}

/// Pauses the VM; returns the last counter it printed (a line written just
/// before the pause may still be on its way, so lines are taken until none
/// comes for a while).
fn pause(vm: &mut Twinvm, dir: &Path, socket: &Path, mut last: u64) -> u64 {
    assert_eq!(ctl_ok(vm, dir, socket, &["pause"]).trim(), "VM paused");
    while let Ok(line) = vm.wait_for_line(is_counter, Duration::from_millis(1500)) {
        last = counter_of(&line);
    }
    last
}

/// Restores the snapshot in `snap` with the same flags and returns the
/// first two counter lines; the guest must not boot again (no banner).
fn restore_counters(snap: &Path) -> (u64, u64) {
    let mut vm = Twinvm::spawn(&["run", "--memory", MEMORY, "--restore", path_str(snap)]);
    let first = vm
        .wait_for_line(|l| is_counter(l) || l.contains(BANNER), T)
        .unwrap();
    assert!(
        is_counter(&first),
        "the restored guest booted again\n{}",
        vm.transcript()
    );
    let second = counter_of(&vm.wait_for_line(is_counter, T).unwrap());
    vm.send_line("poweroff");
    let exit = vm.wait_exit(T).unwrap();
    assert!(exit.success(), "{}", vm.transcript());
    assert!(!vm.stdout().contains(BANNER), "{}", vm.transcript());
    (counter_of(&first), second)
}

/// Takes a snapshot of a paused test guest into `dir/snap` and stops the
/// VM; returns the last counter printed before the snapshot.
fn paused_snapshot(dir: &Path) -> u64 {
    let (mut vm, socket, seen) = boot(dir);
    let last = pause(&mut vm, dir, &socket, seen);
    let out = ctl_ok(&vm, dir, &socket, &["snapshot", "--to", "snap"]);
    assert_eq!(out.trim(), "snapshot written to snap");
    assert_eq!(
        ctl_ok(&vm, dir, &socket, &["stop"]).trim(),
        "VM powering off"
    );
    let exit = vm.wait_exit(T).unwrap();
    assert_eq!(exit.code(), Some(0), "{}", vm.transcript());
    last
}

#[test]
fn ctl_snapshot_then_restore_continues_the_counter() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-cli");
    let d = dir.path();
    let (mut vm, socket, before) = boot(d);

    // A running VM is paused for the snapshot and runs on afterwards.
    let running = d.join("running");
    let out = ctl_ok(&vm, d, &socket, &["snapshot", "--to", path_str(&running)]);
    assert_eq!(
        out.trim(),
        format!("snapshot written to {}", running.display())
    );
    assert!(running.join("state.bin").is_file() && running.join("memory.bin").is_file());
    assert_eq!(state(&vm, d, &socket), "running");
    let after = counter_of(&vm.wait_for_line(is_counter, T).unwrap());

    // A paused VM stays paused. The path is relative to ctl's directory.
    let last = pause(&mut vm, d, &socket, after);
    let out = ctl_ok(&vm, d, &socket, &["snapshot", "--to", "paused"]);
    assert_eq!(out.trim(), "snapshot written to paused");
    assert!(d.join("paused/state.bin").is_file());
    assert_eq!(state(&vm, d, &socket), "paused");
    let quiet = vm.wait_for_line(is_counter, Duration::from_millis(1500));
    assert!(
        quiet.is_err(),
        "the guest ran after the snapshot: {quiet:?}"
    );

    // An existing snapshot is not replaced.
    let (status, stdout, stderr) = ctl_in(d, &socket, &["snapshot", "--to", "paused"]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert_eq!(state(&vm, d, &socket), "paused");

    assert_eq!(ctl_ok(&vm, d, &socket, &["stop"]).trim(), "VM powering off");
    let exit = vm.wait_exit(T).unwrap();
    assert_eq!(exit.code(), Some(0), "{}", vm.transcript());

    // The paused snapshot: the guest prints every 100 ticks, so the next
    // line is exactly the next multiple — no reset, no repeat.
    let (first, second) = restore_counters(&d.join("paused"));
    assert_eq!(
        first,
        last + 100,
        "the last counter before the snapshot was {last}"
    );
    assert_eq!(second, first + 100);

    // The snapshot of the running VM was taken after `before` was printed:
    // it continues past it.
    let (first, second) = restore_counters(&running);
    assert!(
        first > before,
        "the running snapshot continued at {first}; {before} was printed before it"
    );
    assert_eq!(second, first + 100);
}

/// Asserts a failed `twinvm run`: status 1, nothing on stdout, one error
/// line containing every string in `want`.
fn assert_one_line_error(outcome: (ExitStatus, String, String), want: &[&str]) {
    let (status, stdout, stderr) = outcome;
    let dump = format!("status: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(status.code(), Some(1), "{dump}");
    assert!(stdout.trim().is_empty(), "{dump}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{dump}");
    assert!(lines[0].starts_with("twinvm: error: --restore "), "{dump}");
    for w in want {
        assert!(lines[0].contains(w), "no {w:?} in the error\n{dump}");
    }
}

#[test]
fn restores_that_cannot_work_are_one_line_errors() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapshot-cli-bad");
    let d = dir.path();
    let last = paused_snapshot(d);
    let snap = d.join("snap");
    let snap_arg = path_str(&snap);

    assert_one_line_error(
        run_to_exit(&["run", "--memory", "128M", "--restore", snap_arg], T),
        &["the state is of a VM with 67108864 bytes of memory, this VM has 134217728"],
    );
    assert_one_line_error(
        run_to_exit(
            &[
                "run",
                "--memory",
                MEMORY,
                "--cpus",
                "2",
                "--restore",
                snap_arg,
            ],
            T,
        ),
        &["1 vCPUs, this VM has 2"],
    );

    // A flipped byte in the state file.
    let corrupt = d.join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    let mut state = std::fs::read(snap.join("state.bin")).unwrap();
    let middle = state.len() / 2;
    state[middle] ^= 0x20;
    std::fs::write(corrupt.join("state.bin"), state).unwrap();
    std::fs::copy(snap.join("memory.bin"), corrupt.join("memory.bin")).unwrap();
    assert_one_line_error(
        run_to_exit(
            &["run", "--memory", MEMORY, "--restore", path_str(&corrupt)],
            T,
        ),
        &["state.bin", "the state is corrupt (CRC32"],
    );

    // No directory, or one without a snapshot.
    let missing = d.join("missing");
    assert_one_line_error(
        run_to_exit(&["run", "--restore", path_str(&missing)], T),
        &["no such directory"],
    );
    let empty = d.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_one_line_error(
        run_to_exit(&["run", "--restore", path_str(&empty)], T),
        &["holds no complete snapshot"],
    );

    // The good snapshot is untouched by all that.
    let (first, _) = restore_counters(&snap);
    assert_eq!(first, last + 100);
}
