//! `rig.json`: what a kept rig needs to be found and stopped from another process.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, Result, RigError};
use crate::util::lock;

/// Name of the state file of a rig directory.
pub(crate) const STATE_FILE: &str = "rig.json";
/// Version of the state file format.
pub(crate) const STATE_VERSION: u32 = 1;

/// What `rig.json` records: enough to find and stop a kept rig from another process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RigState {
    /// Format version.
    pub version: u32,
    /// The rig directory.
    pub dir: PathBuf,
    /// The process that started the rig.
    pub started_by_pid: u32,
    /// The client-side private store directory.
    pub client_store: PathBuf,
    /// One record per builder.
    pub builders: Vec<BuilderRecord>,
}

/// One builder in `rig.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuilderRecord {
    /// `builderN`.
    pub name: String,
    /// The sshd port on 127.0.0.1.
    pub port: u16,
    /// The listening sshd's pid, if running.
    pub sshd_pid: Option<u32>,
    /// Inode of the builder's mount namespace, if running.
    pub mount_ns: Option<u64>,
    /// The builder's private store directory.
    pub store: PathBuf,
    /// Device and inode of `<store>/nix`: a process whose `/proc/<pid>/root/nix` is this file
    /// belongs to the builder.
    pub store_nix_dev: u64,
    /// See `store_nix_dev`.
    pub store_nix_ino: u64,
    /// sshd's log file.
    pub sshd_log: PathBuf,
    /// The host key's public line.
    pub host_key: String,
}

/// The shared, persisted view of the rig's processes; builders update their entry whenever
/// their sshd starts or stops.
#[derive(Debug)]
pub(crate) struct StateFile {
    pub(crate) path: PathBuf,
    pub(crate) state: Mutex<RigState>,
}

impl StateFile {
    pub(crate) fn update(&self, f: impl FnOnce(&mut RigState)) -> Result<()> {
        let mut state = lock(&self.state);
        f(&mut state);
        write_state(&self.path, &state)
    }
}

fn write_state(path: &Path, state: &RigState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| RigError::State {
        path: path.to_owned(),
        reason: format!("serialising: {e}"),
    })?;
    // Write-then-rename: a concurrent `stop_dir` never reads half a file.
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, json).ctx(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("renaming {} into place", tmp.display()))
}
