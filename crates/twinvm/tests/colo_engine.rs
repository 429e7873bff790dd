//! The COLO engine driven in-process: a primary and a secondary VM of the
//! bundled test guest in this process, kept in step by
//! `replication::colo` over loopback, with digests compared at every
//! checkpoint.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest;
use replication::colo::{self, ColoRole, Handle, Params, State, Trigger};

fn wait_state(h: &Handle, want: State, limit: Duration) {
    let deadline = Instant::now() + limit;
    while h.status().state != want {
        assert!(
            Instant::now() < deadline,
            "state {want:?} not reached within {limit:?}: {:#?}",
            h.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn secondary_follows_the_primary_with_equal_digests() {
    if !common::kvm_available() {
        return;
    }
    let config = guest::guest_config(64 << 20, "dirty_rate=2000");
    let (primary, p_lines) = guest::boot(&config);
    let primary = Arc::new(primary);
    let (s_tx, s_rx) = std::sync::mpsc::channel();
    let s_partial = Arc::new(std::sync::Mutex::new(Vec::new()));
    let secondary = Arc::new(
        vmm::Vm::new_incoming(
            &config,
            vmm::Console {
                output: Box::new(guest::LineSink {
                    partial: s_partial.clone(),
                    lines: s_tx,
                }),
                input: None,
            },
        )
        .expect("build the secondary"),
    );
    let s_lines = guest::Lines {
        rx: s_rx,
        partial: s_partial,
    };
    let listener = colo::listen("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().unwrap().to_string();
    let params = Params {
        interval: Duration::from_millis(100),
        verify: true,
        ..Params::default()
    };
    let sh = Handle::new(ColoRole::Secondary, "", &params);
    let ph = Handle::new(ColoRole::Primary, addr.clone(), &params);
    let st = {
        let (vm, h, p) = (secondary.clone(), sh.clone(), params.clone());
        std::thread::spawn(move || colo::run_secondary(&vm, &listener, &p, &h))
    };
    let pt = {
        let (vm, h, p) = (primary.clone(), ph.clone(), params.clone());
        std::thread::spawn(move || colo::run_primary(&vm, &addr, &p, &h))
    };
    wait_state(&ph, State::Protected, Duration::from_secs(60));
    wait_state(&sh, State::Protected, Duration::from_secs(60));
    let before = p_lines.wait_counter();
    // The secondary runs the same guest from the primary's state.
    // Its console is speculative: a checkpoint can roll the guest back in
    // the middle of a line, which it then prints again after the cut.
    let line = s_lines.wait(|l| l.contains("counter="));
    let s_first: u64 = line
        .rsplit("counter=")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"));
    assert!(
        s_first >= before.saturating_sub(200),
        "{s_first} vs {before}"
    );
    for _ in 0..5 {
        let info = ph
            .request_checkpoint(Trigger::Request, Duration::from_secs(30))
            .expect("checkpoint");
        assert!(info.digest.is_some());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ph.status().checkpoints < 30 {
        assert!(Instant::now() < deadline, "{:#?}", ph.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = ph.status();
    let ss = sh.status();
    assert_eq!(ps.state, State::Protected, "{ps:#?}");
    assert_eq!(ss.state, State::Protected, "{ss:#?}");
    assert!(ps.verified_checkpoints >= 30, "{ps:#?}");
    assert!(ss.verified_checkpoints >= 30, "{ss:#?}");
    eprintln!("primary: {ps:#?}\nsecondary: {ss:#?}");
    ph.stop();
    pt.join().unwrap();
    // The primary ended in order: the secondary's VM ends with it.
    wait_state(&sh, State::Stopped, Duration::from_secs(30));
    st.join().unwrap().expect("secondary");
    assert_eq!(
        secondary.wait().expect("secondary VM"),
        vmm::VmExit::PowerOff
    );
    assert!(s_lines.drain().iter().all(|l| l != common::BANNER));
    drop(p_lines);
}
