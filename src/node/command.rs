//! Running external tools (rbd, losetup, mkfs, ...) with a deadline.
//!
//! Every command is described by a [`CommandSpec`] first, so tests can check the exact argv without
//! running anything, and so a command line can be logged: specs never carry secrets (keys travel in
//! 0600 key files, see [`crate::node::mapper::KeyFile`]).

use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use super::NodeError;

/// One external command: program, arguments and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Start the child in its own process group, so a daemon it leaves behind (rbd-fuse, rbd-nbd)
    /// does not share our group's signals and outlives the plugin.
    pub own_process_group: bool,
    /// Never kill it (mkfs, fsck, resize, umount): past the deadline the caller is answered
    /// and the command is still awaited, see [`crate::node::step::to_end`].
    pub must_finish: bool,
    /// `cgroup.procs` files the child joins before exec (mapper daemons leave the plugin's
    /// cgroups, see [`crate::node::mapper::cgroup`]).
    pub cgroup_procs: Vec<PathBuf>,
}

impl CommandSpec {
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            own_process_group: false,
            must_finish: false,
            cgroup_procs: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn detached(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// Starts the command in these cgroups (their `cgroup.procs` files) instead of ours.
    pub fn in_cgroups(mut self, procs: Vec<PathBuf>) -> Self {
        self.cgroup_procs = procs;
        self
    }

    /// Marks a command that must never be killed half-way.
    pub fn to_end(mut self) -> Self {
        self.must_finish = true;
        self
    }
}

impl fmt::Display for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            write!(f, "{k}={v} ")?;
        }
        f.write_str(&self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `spec` to completion within `timeout`; a non-zero exit is *not* an error here.
/// The child is killed if the deadline passes (or the future is dropped), unless it
/// [must finish](CommandSpec::to_end): then it is awaited to its end and, if dropped, left to
/// finish on its own.
pub async fn run(spec: &CommandSpec, timeout: Duration) -> Result<CommandOutput, NodeError> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(!spec.must_finish);
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    if spec.own_process_group {
        cmd.process_group(0);
    }
    let spawn_error = |source| NodeError::CommandSpawn {
        program: spec.program.clone(),
        source,
    };
    if !spec.cgroup_procs.is_empty() {
        super::mapper::cgroup::join_before_exec(&mut cmd, &spec.cgroup_procs)
            .map_err(spawn_error)?;
    }
    tracing::debug!(command = %spec, "running");
    let child = cmd.spawn().map_err(spawn_error)?;
    let done = if spec.must_finish {
        super::step::to_end(&spec.program, timeout, child.wait_with_output()).await
    } else {
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(done) => done,
            Err(_) => {
                return Err(NodeError::CommandTimeout {
                    program: spec.program.clone(),
                    after: timeout,
                })
            }
        }
    };
    match done {
        Err(source) => Err(NodeError::CommandSpawn {
            program: spec.program.clone(),
            source,
        }),
        Ok(out) => Ok(CommandOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
    }
}

/// Runs `spec` and turns a non-zero exit into [`NodeError::CommandFailed`] carrying stderr.
pub async fn run_ok(spec: &CommandSpec, timeout: Duration) -> Result<CommandOutput, NodeError> {
    let out = run(spec, timeout).await?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(failed(spec, &out))
    }
}

/// The error for a command that exited unsuccessfully.
pub fn failed(spec: &CommandSpec, out: &CommandOutput) -> NodeError {
    NodeError::CommandFailed {
        program: spec.program.clone(),
        code: out.code(),
        stderr: out.stderr.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_program_and_args() {
        let spec = CommandSpec::new("rbd-fuse")
            .env("CEPH_ARGS", "--id a")
            .args(["-p", "rbd"]);
        assert_eq!(spec.to_string(), "CEPH_ARGS=--id a rbd-fuse -p rbd");
    }

    #[tokio::test]
    async fn failing_command_reports_program_and_stderr() {
        let spec = CommandSpec::new("sh").args(["-c", "echo boom >&2; exit 3"]);
        let err = run_ok(&spec, Duration::from_secs(5)).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sh") && msg.contains("boom") && msg.contains('3'),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_command_that_must_finish_outlives_its_deadline_and_a_dropped_caller() {
        let dir = tempfile::tempdir().unwrap();
        let done = dir.path().join("done");
        let spec = CommandSpec::new("sh")
            .args(["-c", &format!("sleep 0.3; echo ok > {}", done.display())])
            .to_end();
        // The caller gives up (a dropped RPC) long before the command is over.
        let call = run(&spec, Duration::from_secs(5));
        assert!(tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(done.exists(), "the command was killed with its caller");

        let spec = CommandSpec::new("sh")
            .args(["-c", "sleep 0.2; echo finished"])
            .to_end();
        let out = run(&spec, Duration::from_millis(20)).await.unwrap();
        assert_eq!(out.stdout.trim(), "finished");
    }

    #[tokio::test]
    async fn slow_command_times_out() {
        let spec = CommandSpec::new("sleep").arg("5");
        let err = run(&spec, Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, NodeError::CommandTimeout { .. }));
    }
}
