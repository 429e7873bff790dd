//! The control API of a running VM: HTTP/1.1 requests with JSON bodies on
//! a Unix socket (`twinvm run --api-socket PATH`), and the types its server
//! and its client (`twinvm ctl`) share. See docs/api.md.
//!
//! - [`http`]: parsing requests and responses, writing them; pure.
//! - [`router`]: the endpoints, and the [`router::Control`] they act on.
//! - [`server`]: the socket and the connection threads.
//! - [`vm`]: the [`router::Control`] of a real [`vmm::Vm`].

pub mod http;
pub mod router;
pub mod server;
pub mod vm;

use serde::{Deserialize, Serialize};

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The vCPUs and device workers run.
    Running,
    /// Everything is frozen (`PUT /vm/pause`) until `PUT /vm/resume`.
    Paused,
}

/// The body of `GET /vm`.
///
/// Clients ignore fields they do not know, so fields can be added (e.g. the
/// progress of a snapshot) without breaking older clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Running or paused.
    pub state: RunState,
    /// Milliseconds since the VM started, paused time included (0 while
    /// it waits for an incoming migration).
    pub uptime_ms: u64,
    /// Fixed at start: vCPUs, memory and devices.
    #[serde(flatten)]
    pub summary: VmSummary,
    /// The migration running, or the last one (outgoing or incoming);
    /// absent if there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<replication::migration::Progress>,
    /// COLO protection (`twinvm run --role ...`): role, state, checkpoint
    /// figures; absent without a role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<replication::colo::Status>,
}

/// What the VM was built with; does not change while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Network devices and disks, each in the order the guest sees them.
    pub devices: Devices,
}

/// The VM's devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// virtio-net devices.
    pub net: Vec<NetDevice>,
    /// virtio-blk devices.
    pub disks: Vec<DiskDevice>,
}

/// A network device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDevice {
    /// The host tap device.
    pub tap: String,
    /// The guest's MAC address, "52:54:00:12:34:56" (the assigned default if
    /// none was configured).
    pub mac: String,
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDevice {
    /// The image file as configured (a path that is not UTF-8 is shown with
    /// replacement characters).
    pub path: String,
    /// The guest cannot write to it.
    pub readonly: bool,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, on one line.
    pub error: String,
}

impl VmSummary {
    /// The summary of `config`.
    pub fn of(config: &vmm::VmConfig) -> VmSummary {
        let net = config
            .net
            .iter()
            .enumerate()
            .map(|(index, n)| NetDevice {
                tap: n.tap.clone(),
                mac: format_mac(
                    &n.mac
                        .unwrap_or_else(|| vmm::devices::virtio::net::default_mac(index)),
                ),
            })
            .collect();
        let disks = config
            .disks
            .iter()
            .map(|d| DiskDevice {
                path: d.path.to_string_lossy().into_owned(),
                readonly: d.readonly,
            })
            .collect();
        VmSummary {
            vcpus: config.vcpus,
            memory_bytes: config.memory_bytes,
            devices: Devices { net, disks },
        }
    }
}

/// "52:54:00:12:34:56".
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> vmm::VmConfig {
        vmm::VmConfig {
            memory_bytes: 64 << 20,
            vcpus: 2,
            kernel: vmm::KernelSource::Bytes(b""),
            initrd: None,
            cmdline: String::new(),
            net: vec![
                vmm::NetConfig {
                    tap: "tap0".into(),
                    mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
                },
                vmm::NetConfig {
                    tap: "tap1".into(),
                    mac: None,
                },
            ],
            disks: vec![vmm::DiskConfig {
                path: "/img/root.img".into(),
                readonly: true,
                serial: None,
            }],
            prefault: false,
        }
    }

    #[test]
    fn status_json_has_the_documented_shape() {
        let status = VmStatus {
            state: RunState::Paused,
            uptime_ms: 1234,
            summary: VmSummary::of(&config()),
            migration: None,
            replication: None,
        };
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "state": "paused",
                "uptime_ms": 1234,
                "vcpus": 2,
                "memory_bytes": 67108864,
                "devices": {
                    "net": [
                        {"tap": "tap0", "mac": "52:54:00:ab:cd:ef"},
                        // The VMM's default for the second network device.
                        {"tap": "tap1", "mac": "52:54:00:12:34:57"}
                    ],
                    "disks": [{"path": "/img/root.img", "readonly": true}]
                }
            })
        );
        let back: VmStatus = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, status);
    }

    #[test]
    fn migration_progress_is_part_of_the_status() {
        let progress = replication::migration::ProgressHandle::new(
            replication::migration::Direction::Incoming,
            "",
        );
        let status = VmStatus {
            state: RunState::Paused,
            uptime_ms: 0,
            summary: VmSummary::of(&config()),
            migration: Some(progress.get()),
            replication: None,
        };
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["migration"]["direction"], "incoming");
        assert_eq!(json["migration"]["phase"], "waiting");
        assert_eq!(json["migration"]["report"], serde_json::Value::Null);
        let back: VmStatus = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, status);
    }

    #[test]
    fn replication_status_is_part_of_the_status() {
        let params = replication::colo::Params::default();
        let handle = replication::colo::Handle::new(
            replication::colo::ColoRole::Primary,
            "10.0.0.2:7777",
            &params,
        );
        let status = VmStatus {
            state: RunState::Running,
            uptime_ms: 5,
            summary: VmSummary::of(&config()),
            migration: None,
            replication: Some(handle.status()),
        };
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["replication"]["role"], "primary");
        assert_eq!(json["replication"]["state"], "connecting");
        assert_eq!(json["replication"]["peer"], "10.0.0.2:7777");
        assert_eq!(json["replication"]["interval_ms"], 200.0);
        assert_eq!(
            json["replication"]["last_checkpoint"],
            serde_json::Value::Null
        );
        let back: VmStatus = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, status);
    }

    #[test]
    fn clients_ignore_unknown_status_fields() {
        let text = r#"{"state":"running","uptime_ms":5,"vcpus":1,"memory_bytes":4096,
            "devices":{"net":[],"disks":[]},"snapshot":{"progress":0.5}}"#;
        let status: VmStatus = serde_json::from_str(text).expect("decodes");
        assert_eq!(status.state, RunState::Running);
        assert_eq!(status.summary.vcpus, 1);
    }
}
