//! Bad input must end `twinvm` quickly with one clear error line on stderr
//! and a non-zero exit status — never a panic, never a hang.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::{TempDir, kvm_available, path_str, run_command_to_exit, run_to_exit, twinvm_bin};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Exit status for a command-line usage error (as clap uses).
const USAGE: i32 = 2;
/// Exit status for every other error.
const FAILURE: i32 = 1;

/// Asserts the outcome of a rejected run: exit status `code`, nothing on
/// stdout, and exactly one non-empty stderr line, `twinvm: error: ...`,
/// containing every string in `want` (compared case-insensitively).
fn assert_rejected(outcome: (ExitStatus, String, String), code: i32, want: &[&str]) {
    let (status, stdout, stderr) = outcome;
    let dump = format!("status: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "twinvm panicked\n{dump}");
    assert_eq!(status.code(), Some(code), "wrong exit status\n{dump}");
    assert!(
        stdout.trim().is_empty(),
        "unexpected output on stdout\n{dump}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line\n{dump}");
    let line = lines[0];
    assert!(
        line.starts_with("twinvm: error: "),
        "error line lacks the prefix\n{dump}"
    );
    let lower = line.to_lowercase();
    for w in want {
        assert!(
            lower.contains(&w.to_lowercase()),
            "error line does not mention {w:?}\n{dump}"
        );
    }
}

fn reject(args: &[&str], code: i32, want: &[&str]) {
    assert_rejected(run_to_exit(args, TIMEOUT), code, want);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ---- command line (checked before the VMM runs) ----

#[test]
fn memory_zero() {
    reject(
        &["run", "--memory", "0"],
        USAGE,
        &["memory", "greater than zero"],
    );
}

#[test]
fn memory_not_a_size() {
    reject(
        &["run", "--memory", "abc"],
        USAGE,
        &["memory", "'abc' is not a size"],
    );
}

#[test]
fn memory_empty_negative_overflow_unaligned() {
    reject(&["run", "--memory", ""], USAGE, &["memory"]);
    reject(&["run", "--memory", "-64M"], USAGE, &["memory", "negative"]);
    reject(
        &["run", "--memory", "99999999999T"],
        USAGE,
        &["memory", "too large"],
    );
    reject(&["run", "--memory", "4097"], USAGE, &["memory", "4 KiB"]);
}

#[test]
fn cpus_zero() {
    reject(
        &["run", "--cpus", "0"],
        USAGE,
        &["cpus", "between 1 and 255"],
    );
}

#[test]
fn cpus_above_limit() {
    reject(&["run", "--cpus", "1000"], USAGE, &["cpus"]);
}

#[test]
fn unknown_flag() {
    reject(&["run", "--kernal", "x"], USAGE, &["--kernal", "--kernel"]);
}

#[test]
fn unknown_subcommand() {
    reject(&["boot"], USAGE, &["boot"]);
}

#[test]
fn help_is_not_an_error() {
    let (status, stdout, stderr) = run_to_exit(&["run", "--help"], TIMEOUT);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("--memory <SIZE>"), "{stdout}");
}

#[test]
fn net_invalid_mac() {
    reject(
        &["run", "--net", "tap=t0,mac=zz:00:00:00:00:00"],
        USAGE,
        &["--net", "mac", "zz:00:00:00:00:00"],
    );
    reject(
        &["run", "--net", "tap=t0,mac=52:54:00:12:34"],
        USAGE,
        &["mac", "52:54:00:12:34"],
    );
}

#[test]
fn net_multicast_mac() {
    reject(
        &["run", "--net", "tap=t0,mac=01:00:5e:00:00:01"],
        USAGE,
        &["mac", "01:00:5e:00:00:01", "multicast"],
    );
    reject(
        &["run", "--net", "tap=t0,mac=ff:ff:ff:ff:ff:ff"],
        USAGE,
        &["mac", "multicast"],
    );
}

#[test]
fn net_zero_mac() {
    reject(
        &["run", "--net", "tap=t0,mac=00:00:00:00:00:00"],
        USAGE,
        &["mac", "all zeros"],
    );
}

#[test]
fn net_without_tap() {
    reject(
        &["run", "--net", "mac=52:54:00:12:34:56"],
        USAGE,
        &["tap=NAME", "required"],
    );
    reject(&["run", "--net", "tap0"], USAGE, &["tap=tap0"]);
}

#[test]
fn net_bad_tap_name() {
    reject(
        &["run", "--net", "tap=much-too-long-name"],
        USAGE,
        &["tap", "much-too-long-name", "15 bytes"],
    );
    reject(&["run", "--net", "tap=a/b"], USAGE, &["tap", "a/b", "'/'"]);
    reject(&["run", "--net", "tap="], USAGE, &["tap", "empty"]);
}

#[test]
fn net_unknown_key() {
    reject(
        &["run", "--net", "tap=t0,model=e1000"],
        USAGE,
        &["--net", "unknown", "model"],
    );
}

#[test]
fn net_duplicate_key() {
    reject(
        &["run", "--net", "tap=t0,tap=t1"],
        USAGE,
        &["tap", "more than once"],
    );
}

#[test]
fn net_duplicate_tap() {
    reject(
        &[
            "run", "--net", "tap=t0", "--net", "tap=t1", "--net", "tap=t0",
        ],
        USAGE,
        &["tap", "'t0'", "two network devices"],
    );
}

#[test]
fn disk_bad_serial() {
    reject(
        &["run", "--disk", "a.img,serial=123456789012345678901"],
        USAGE,
        &["--disk", "serial", "123456789012345678901", "at most 20"],
    );
    reject(
        &["run", "--disk", "a.img,serial=dätä"],
        USAGE,
        &["disk", "serial", "printable ascii"],
    );
    reject(
        &["run", "--disk", "a.img,serial="],
        USAGE,
        &["disk", "serial", "empty"],
    );
}

#[test]
fn disk_unknown_option() {
    reject(
        &["run", "--disk", "a.img,ro"],
        USAGE,
        &["--disk", "unknown disk option 'ro'"],
    );
    // The path ends at the first comma.
    reject(
        &["run", "--disk", "my,disk.img"],
        USAGE,
        &["disk", "'disk.img'", "cannot contain ','"],
    );
    reject(
        &["run", "--disk", "a.img,readonly=yes"],
        USAGE,
        &["disk", "readonly", "no value"],
    );
}

#[test]
fn disk_empty_path() {
    reject(
        &["run", "--disk", ",readonly"],
        USAGE,
        &["disk", "path is empty"],
    );
}

#[test]
fn disk_duplicate_path() {
    let dir = TempDir::new("disk-dup");
    let img = dir.write("a.img", vec![0u8; 4096]);
    let dot = dir.path().join(".").join("a.img");
    reject(
        &["run", "--disk", path_str(&img), "--disk", path_str(&dot)],
        USAGE,
        &["disk", path_str(&img), "same image file"],
    );
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).expect("symlink");
    reject(
        &[
            "run",
            "--disk",
            &format!("{},readonly", path_str(&img)),
            "--disk",
            &format!("{},readonly", path_str(&link)),
        ],
        USAGE,
        &["disk", path_str(&link), "same image file"],
    );
}

// ---- config file ----

#[test]
fn config_unknown_key() {
    let dir = TempDir::new("cfg-unknown");
    let cfg = dir.write("vm.toml", "[vm]\ncpus = 1\nmemroy = \"512M\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["memroy", path_str(&cfg), "line 3"],
    );
}

#[test]
fn config_unknown_section() {
    let dir = TempDir::new("cfg-section");
    let cfg = dir.write("vm.toml", "[machine]\ncpus = 1\n");
    reject(&["run", "--config", path_str(&cfg)], FAILURE, &["machine"]);
}

#[test]
fn config_wrong_type() {
    let dir = TempDir::new("cfg-type");
    let cfg = dir.write("vm.toml", "[vm]\ncpus = \"two\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["invalid type"],
    );
}

#[test]
fn config_bad_values() {
    let dir = TempDir::new("cfg-values");
    let cfg = dir.write("zero-cpus.toml", "[vm]\ncpus = 0\n");
    reject(&["run", "--config", path_str(&cfg)], FAILURE, &["cpus"]);
    let cfg = dir.write("zero-mem.toml", "[vm]\nmemory = 0\n");
    reject(&["run", "--config", path_str(&cfg)], FAILURE, &["memory"]);
    let cfg = dir.write("bad-mem.toml", "[vm]\nmemory = \"lots\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["memory", "lots"],
    );
}

#[test]
fn config_not_toml() {
    let dir = TempDir::new("cfg-syntax");
    let cfg = dir.write("vm.toml", "[vm\ncpus = 1\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "line 1"],
    );
}

#[test]
fn config_missing() {
    let dir = TempDir::new("cfg-missing");
    let cfg = dir.path().join("nope.toml");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["cannot read config file", path_str(&cfg), "no such file"],
    );
}

#[test]
fn config_net_bad_mac() {
    let dir = TempDir::new("cfg-mac");
    let cfg = dir.write(
        "vm.toml",
        "[[net]]\ntap = \"t0\"\nmac = \"03:00:00:00:00:01\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "line 3", "mac", "multicast"],
    );
}

#[test]
fn config_net_missing_tap() {
    let dir = TempDir::new("cfg-notap");
    let cfg = dir.write("vm.toml", "[[net]]\nmac = \"52:54:00:12:34:56\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "missing field `tap`"],
    );
}

#[test]
fn config_net_duplicate_tap() {
    let dir = TempDir::new("cfg-duptap");
    let cfg = dir.write(
        "vm.toml",
        "[[net]]\ntap = \"t0\"\n\n[[net]]\ntap = \"t0\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "line 5", "tap", "'t0'"],
    );
}

#[test]
fn config_disk_errors() {
    let dir = TempDir::new("cfg-disk");
    let cfg = dir.write(
        "unknown.toml",
        "[[disk]]\npath = \"a.img\"\nformat = \"raw\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["unknown field `format`", "line 3"],
    );
    let cfg = dir.write(
        "serial.toml",
        "[[disk]]\npath = \"a.img\"\nserial = \"tab\\there\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["disk serial", "'tab\\there'", "line 3"],
    );
    // Relative paths are resolved against the config file's directory
    // before they are compared.
    let cfg = dir.write(
        "dup.toml",
        format!(
            "[[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"{}\"\n",
            path_str(&dir.path().join("a.img"))
        ),
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["disk", path_str(&dir.path().join("a.img")), "line 4"],
    );
    let cfg = dir.write("single.toml", "[disk]\npath = \"a.img\"\n");
    reject(&["run", "--config", path_str(&cfg)], FAILURE, &["[[disk]]"]);
}

// ---- rejected by the VMM ----

#[test]
fn kernel_missing() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-missing");
    let kernel = dir.path().join("no-such-bzImage");
    reject(
        &["run", "--kernel", path_str(&kernel)],
        FAILURE,
        &["kernel", path_str(&kernel)],
    );
}

#[test]
fn kernel_missing_via_config_names_resolved_path() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-missing-cfg");
    let cfg = dir.write("vm.toml", "[vm]\nkernel = \"images/bzImage\"\n");
    let resolved = dir.path().join("images/bzImage");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["kernel", path_str(&resolved)],
    );
}

#[test]
fn kernel_unreadable() {
    if !kvm_available() {
        return;
    }
    // Root can read any file regardless of its mode, but not read() a
    // directory.
    let dir = TempDir::new("kernel-dir");
    reject(
        &["run", "--kernel", path_str(dir.path())],
        FAILURE,
        &["kernel", path_str(dir.path())],
    );
}

#[test]
fn kernel_neither_bzimage_nor_elf() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("kernel-format");
    let text = "this is not a kernel image\n".repeat(1000);
    let kernel = dir.write("kernel.txt", text);
    reject(
        &["run", "--kernel", path_str(&kernel)],
        FAILURE,
        &["bzImage"],
    );
}

#[test]
fn initrd_larger_than_memory() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("initrd-big");
    let initrd = dir.path().join("initrd.img");
    let file = std::fs::File::create(&initrd).expect("create initrd");
    file.set_len(128 << 20).expect("size sparse initrd");
    drop(file);
    reject(
        &["run", "--memory", "64M", "--initrd", path_str(&initrd)],
        FAILURE,
        &["initrd"],
    );
}

#[test]
fn tap_missing() {
    if !kvm_available() {
        return;
    }
    // At most 15 bytes, or the command line rejects the name first.
    let tap = "twvm-noexist0";
    reject(
        &["run", "--net", &format!("tap={tap}")],
        FAILURE,
        &["tap", tap, "does not exist"],
    );
}

#[test]
fn disk_missing() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("disk-missing");
    let img = dir.path().join("no-such.img");
    reject(
        &["run", "--disk", path_str(&img)],
        FAILURE,
        &["disk", path_str(&img), "does not exist"],
    );
}

#[test]
fn disk_missing_via_config_names_resolved_path() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("disk-missing-cfg");
    let cfg = dir.write("vm.toml", "[[disk]]\npath = \"images/data.img\"\n");
    let resolved = dir.path().join("images/data.img");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["disk", path_str(&resolved)],
    );
}

#[test]
fn disk_is_a_directory() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("disk-dir");
    reject(
        &["run", "--disk", path_str(dir.path())],
        FAILURE,
        &["disk", path_str(dir.path())],
    );
}

#[test]
fn disk_read_only_file_without_readonly() {
    if !kvm_available() {
        return;
    }
    // Root could open a mode 0444 file for writing anyway; the VMM takes a
    // file without write permission as meant to be read-only and refuses to
    // attach it writable.
    let dir = TempDir::new("disk-ro");
    let img = dir.write("ro.img", vec![0u8; 1 << 20]);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).expect("chmod image");
    reject(
        &["run", "--disk", path_str(&img)],
        FAILURE,
        &["disk", path_str(&img), "not writable", "readonly"],
    );
}

#[test]
fn memory_more_than_the_host_has() {
    if !kvm_available() {
        return;
    }
    reject(&["run", "--memory", "100T"], FAILURE, &["memory"]);
}

#[test]
fn dev_kvm_missing() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to make a private /dev");
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ])
    .arg(twinvm_bin())
    .arg("run")
    .env_remove("TWINVM_LOG");
    assert_rejected(run_command_to_exit(cmd, TIMEOUT), FAILURE, &["/dev/kvm"]);
}

#[test]
fn dev_kvm_not_permitted() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to switch to an unprivileged user");
        return;
    }
    match std::fs::metadata("/dev/kvm") {
        Ok(m) if m.permissions().mode() & 0o006 == 0o006 => {
            eprintln!("SKIPPED: /dev/kvm is open to every user on this host");
            return;
        }
        _ => {}
    }
    // The build tree may not be reachable for "nobody": run a copy.
    let dir = TempDir::new("kvm-eacces");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let bin = dir.path().join("twinvm");
    // Copy with cp(1), not std::fs::copy: a writable fd for the copy held by
    // this (multi-threaded) test process would leak into children forked
    // meanwhile by other tests, and exec would fail with ETXTBSY.
    let copied = Command::new("cp")
        .arg(twinvm_bin())
        .arg(&bin)
        .status()
        .expect("run cp");
    assert!(copied.success(), "cp twinvm: {copied}");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod twinvm");

    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("run")
        .env_remove("TWINVM_LOG");
    assert_rejected(
        run_command_to_exit(cmd, TIMEOUT),
        FAILURE,
        &["/dev/kvm", "permission"],
    );
}

// ---- control API (the socket is set up before the VM is built) ----

#[test]
fn api_socket_in_a_missing_directory() {
    let dir = TempDir::new("api-nodir");
    let socket = dir.path().join("no/such/dir/api.sock");
    reject(
        &["run", "--api-socket", path_str(&socket)],
        FAILURE,
        &["API socket", path_str(&socket), "no such file or directory"],
    );
}

#[test]
fn api_socket_path_is_a_regular_file() {
    let dir = TempDir::new("api-file");
    let file = dir.write("api.sock", "not a socket");
    reject(
        &["run", "--api-socket", path_str(&file)],
        FAILURE,
        &["API socket", path_str(&file), "not a socket"],
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("file kept"),
        "not a socket"
    );
}

#[test]
fn api_socket_path_empty_or_too_long() {
    reject(
        &["run", "--api-socket", ""],
        USAGE,
        &["--api-socket", "empty"],
    );
    let dir = TempDir::new("api-long");
    let socket = dir.path().join("s".repeat(120));
    reject(
        &["run", "--api-socket", path_str(&socket)],
        FAILURE,
        &["API socket", path_str(&socket), "too long", "at most 107"],
    );
}

#[test]
fn config_api_errors() {
    let dir = TempDir::new("cfg-api");
    let cfg = dir.write("vm.toml", "[api]\nsocket = \"vm.sock\"\nport = 8080\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "unknown field `port`", "line 3"],
    );
    // Relative to the config file's directory.
    let cfg = dir.write("nodir.toml", "[api]\nsocket = \"missing/vm.sock\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["API socket", path_str(&dir.path().join("missing/vm.sock"))],
    );
}

#[test]
fn ctl_without_a_vm() {
    let dir = TempDir::new("ctl-novm");
    let socket = dir.path().join("api.sock");
    reject(
        &["ctl", "--socket", path_str(&socket), "status"],
        FAILURE,
        &["cannot connect", path_str(&socket)],
    );
    // A socket nobody serves.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    reject(
        &["ctl", "--socket", path_str(&socket), "pause"],
        FAILURE,
        &["cannot connect", "refused"],
    );
}

#[test]
fn ctl_talking_to_something_that_is_not_the_api() {
    let dir = TempDir::new("ctl-notapi");
    let socket = dir.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.0\r\n");
    });
    reject(
        &["ctl", "--socket", path_str(&socket), "status"],
        FAILURE,
        &["invalid response"],
    );
    server.join().expect("fake server");
}

#[test]
fn ctl_usage_errors() {
    reject(&["ctl", "status"], USAGE, &["--socket"]);
    reject(
        &["ctl", "--socket", "/tmp/x.sock", "reboot"],
        USAGE,
        &["reboot"],
    );
}

#[test]
fn api_socket_is_removed_when_the_vm_cannot_be_built() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("api-nokernel");
    let socket = dir.path().join("api.sock");
    let kernel = dir.path().join("no-such-bzImage");
    reject(
        &[
            "run",
            "--api-socket",
            path_str(&socket),
            "--kernel",
            path_str(&kernel),
        ],
        FAILURE,
        &["kernel", path_str(&kernel)],
    );
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn snapshot_and_restore_usage_errors() {
    reject(
        &["ctl", "--socket", "/tmp/x.sock", "snapshot"],
        USAGE,
        &["--to"],
    );
    reject(
        &["ctl", "--socket", "/tmp/x.sock", "snapshot", "--to", ""],
        USAGE,
        &["--to", "empty"],
    );
    reject(&["run", "--restore", ""], USAGE, &["--restore", "empty"]);
}

#[test]
fn restore_from_a_directory_that_does_not_exist() {
    let dir = TempDir::new("restore-missing");
    let missing = dir.path().join("no-snapshot");
    reject(
        &["run", "--restore", path_str(&missing)],
        FAILURE,
        &["--restore", path_str(&missing), "no such directory"],
    );
    // A file is not a snapshot directory either.
    let file = dir.write("file", "x");
    reject(
        &["run", "--restore", path_str(&file)],
        FAILURE,
        &["not a directory"],
    );
}

#[test]
fn ctl_snapshot_without_a_vm() {
    let dir = TempDir::new("ctl-snapshot-novm");
    let socket = dir.path().join("api.sock");
    reject(
        &[
            "ctl",
            "--socket",
            path_str(&socket),
            "snapshot",
            "--to",
            path_str(&dir.path().join("snap")),
        ],
        FAILURE,
        &["cannot connect to the API socket"],
    );
    assert!(!dir.path().join("snap").exists());
}

// ---- live migration (key and port are checked before the VM is built) ----

#[test]
fn incoming_on_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("address").to_string();
    reject(
        &["run", "--incoming", &addr],
        FAILURE,
        &["--incoming", &addr, "address already in use"],
    );
    reject(
        &["run", "--incoming", "4444"],
        USAGE,
        &["--incoming", "port"],
    );
    reject(
        &["run", "--incoming", &addr, "--restore", "/snap"],
        USAGE,
        &["--incoming", "--restore"],
    );
}

#[test]
fn unusable_auth_key_files() {
    let dir = TempDir::new("authkey");
    let missing = dir.path().join("missing.key");
    reject(
        &["run", "--auth-key", path_str(&missing)],
        FAILURE,
        &[path_str(&missing), "no such file"],
    );
    let open = dir.write("open.key", [7u8; 32]);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    reject(
        &["run", "--auth-key", path_str(&open)],
        FAILURE,
        &[path_str(&open), "mode 0644", "chmod 600"],
    );
    let short = dir.write("short.key", [7u8; 8]);
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    reject(
        &["run", "--auth-key", path_str(&short)],
        FAILURE,
        &[path_str(&short), "8 bytes", "at least 32"],
    );
    let cfg = dir.write("vm.toml", "[migration]\nauth_key = \"missing.key\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&missing), "no such file"],
    );
}

// ---- COLO replication (options are checked before the VM is built) ----

#[test]
fn replication_role_without_its_address() {
    reject(
        &["run", "--role", "primary"],
        USAGE,
        &["--role primary", "--peer HOST:PORT"],
    );
    reject(
        &["run", "--role", "secondary"],
        USAGE,
        &["--role secondary", "--listen HOST:PORT"],
    );
}

#[test]
fn replication_address_of_the_other_side() {
    reject(
        &[
            "run",
            "--role",
            "secondary",
            "--listen",
            "127.0.0.1:7777",
            "--peer",
            "127.0.0.1:7778",
        ],
        USAGE,
        &["--peer is for a primary"],
    );
    reject(
        &[
            "run",
            "--role",
            "primary",
            "--peer",
            "127.0.0.1:7777",
            "--listen",
            "127.0.0.1:7778",
        ],
        USAGE,
        &["--listen is for a secondary"],
    );
    reject(
        &["run", "--peer", "127.0.0.1:7777"],
        USAGE,
        &["--peer", "--role primary or --role secondary"],
    );
    reject(
        &["run", "--checkpoint-interval-ms", "100"],
        USAGE,
        &["--checkpoint-interval-ms", "--role"],
    );
}

#[test]
fn replication_bad_values() {
    reject(
        &["run", "--role", "backup"],
        USAGE,
        &["--role", "backup", "primary, secondary"],
    );
    reject(
        &["run", "--checkpoint-interval-ms", "5"],
        USAGE,
        &["--checkpoint-interval-ms", "between 10 and 3600000"],
    );
    reject(
        &["run", "--checkpoint-interval-ms", "soon"],
        USAGE,
        &["--checkpoint-interval-ms", "not a whole number"],
    );
    reject(
        &["run", "--replication-channels", "17"],
        USAGE,
        &["--replication-channels", "between 1 and 16"],
    );
    reject(
        &["run", "--vm-id", "0123456789abcdef"],
        USAGE,
        &["--vm-id", "32 hex digits"],
    );
    reject(
        &["run", "--vm-id", "zz112233445566778899aabbccddeeff"],
        USAGE,
        &["--vm-id", "32 hex digits"],
    );
    reject(
        &["run", "--staging-limit", "1K"],
        USAGE,
        &["--staging-limit", "less than one page"],
    );
    reject(
        &["run", "--peer", "10.0.0.2"],
        USAGE,
        &["--peer", "has no port"],
    );
    reject(
        &["run", "--role", "secondary", "--listen", "0.0.0.0:0"],
        USAGE,
        &["--listen", "port 0"],
    );
}

#[test]
fn replication_role_with_incoming_or_restore() {
    reject(
        &[
            "run",
            "--role",
            "secondary",
            "--listen",
            "127.0.0.1:7777",
            "--incoming",
            "127.0.0.1:4444",
        ],
        USAGE,
        &["--role secondary cannot be used with --incoming"],
    );
    reject(
        &[
            "run",
            "--role",
            "primary",
            "--peer",
            "127.0.0.1:7777",
            "--restore",
            "/snap",
        ],
        USAGE,
        &["--role primary cannot be used with --restore"],
    );
}

#[test]
fn replication_listen_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("address").to_string();
    reject(
        &["run", "--role", "secondary", "--listen", &addr],
        FAILURE,
        &["--listen", &addr, "address already in use"],
    );
}

#[test]
fn replication_config_errors() {
    let dir = TempDir::new("cfg-colo");
    let cfg = dir.write("vm.toml", "[replication]\nrole = \"primary\"\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &["`replication.role = \"primary\"` needs", "--peer"],
    );
    let cfg = dir.write("bad.toml", "[replication]\ninterval_ms = 0\n");
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "line 2", "invalid `interval_ms`"],
    );
    let cfg = dir.write(
        "typo.toml",
        "[replication]\nrole = \"primary\"\npeers = \"h:1\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&cfg), "unknown field `peers`"],
    );
    // The flag's role and the file's address of the other side.
    let cfg = dir.write(
        "listen.toml",
        "[replication]\nlisten = \"127.0.0.1:7777\"\n",
    );
    reject(
        &[
            "run",
            "--config",
            path_str(&cfg),
            "--role",
            "primary",
            "--peer",
            "127.0.0.1:7778",
        ],
        FAILURE,
        &["`replication.listen` is for a secondary"],
    );
    // The auth key is checked before anything is built.
    let cfg = dir.write(
        "key.toml",
        "[replication]\nrole = \"secondary\"\nlisten = \"127.0.0.1:7777\"\nauth_key = \"missing.key\"\n",
    );
    reject(
        &["run", "--config", path_str(&cfg)],
        FAILURE,
        &[path_str(&dir.path().join("missing.key")), "no such file"],
    );
}

#[test]
fn ctl_checkpoint_without_a_vm() {
    let dir = TempDir::new("ctl-ckpt");
    let socket = dir.path().join("none.sock");
    reject(
        &["ctl", "--socket", path_str(&socket), "checkpoint"],
        FAILURE,
        &["cannot connect to the API socket"],
    );
}

#[test]
fn secondary_whose_primary_dies_before_the_first_checkpoint() {
    if !kvm_available() {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut secondary = common::Twinvm::spawn(&[
        "run",
        "--memory",
        "64M",
        "--role",
        "secondary",
        "--listen",
        &addr,
    ]);
    // The primary is killed (as a host failure would end it) in the
    // middle of the first checkpoint, as its pause starts sending pages
    // (it may have none to send: protection starts as the guest boots):
    // the secondary's guest never ran.
    let mut primary = Command::new(twinvm_bin());
    primary
        .args([
            "run", "--memory", "64M", "--role", "primary", "--peer", &addr,
        ])
        .env(replication::colo::DIE_ENV, "primary:1:0");
    let (status, _, stderr) = run_command_to_exit(primary, TIMEOUT);
    assert_eq!(status.code(), None, "the primary was not killed: {stderr}");
    let status = secondary.wait_exit(TIMEOUT).unwrap();
    let stderr = secondary.stderr();
    assert_eq!(status.code(), Some(FAILURE), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "twinvm: error: replication failed: the primary was lost before the first checkpoint (the guest never ran here): "
        ),
        "{stderr}"
    );
    assert!(secondary.stdout().is_empty(), "the guest ran");
}
