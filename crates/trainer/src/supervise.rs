//! Work in a child process, supervised: a plugin that aborts (a CHECK failure, SIGFPE, a
//! segfault) takes down the child, and the parent turns that into an error instead of dying too.
//!
//! The parent ([`run`]) starts the child with [`OUTCOME_ENV`] naming a file in a fresh
//! temporary directory. The child ([`serve`]) does the work and writes its outcome there as JSON,
//! the result or its error in words, then exits. The parent reads that file: present, it holds
//! the child's answer whatever the exit status (a crash while the plugin tears down does not undo
//! finished work); absent, the child died before answering, and the parent names how (the signal,
//! or the exit status) with the last lines of the child's stderr. Nothing is read from the text
//! of the child's output.
//!
//! The child's stdout is the parent's; its stderr is captured and replayed on the parent's stderr
//! when the child answered, so plugin logging still shows.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The environment variable that names the file a supervised child writes its outcome to.
pub const OUTCOME_ENV: &str = "RATTN_CHILD_OUTCOME";

/// Lines of the child's stderr kept for the report of a child that died.
const LOG_TAIL_LINES: usize = 20;

/// What a child writes for its parent.
#[derive(Debug, Serialize, Deserialize)]
enum Outcome<T> {
    /// The work's result.
    Done(T),
    /// The work's error, its whole chain in words.
    Failed(String),
}

/// Why a supervised child gave no result.
#[derive(Debug)]
pub enum ChildError {
    /// The work failed in the child; its error, in words.
    Failed(String),
    /// The child ended without answering: killed by a signal, aborted, or exited.
    Died {
        /// How it ended, e.g. `was killed by SIGABRT (6)`, `exited with status 101`.
        how: String,
        /// The last lines of its stderr (at most 20).
        log_tail: Vec<String>,
    },
    /// The child could not be started, or its answer not read.
    Supervisor(anyhow::Error),
}

impl std::fmt::Display for ChildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildError::Failed(message) => f.write_str(message),
            ChildError::Died { how, log_tail } => write!(
                f,
                "the child process {how}. Last lines of its log:\n{}",
                log_tail_text(log_tail)
            ),
            ChildError::Supervisor(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ChildError {}

/// The log tail of [`ChildError::Died`] as one block of text, `(none)` when empty.
pub fn log_tail_text(log_tail: &[String]) -> String {
    if log_tail.is_empty() {
        "(none)".to_string()
    } else {
        log_tail.join("\n")
    }
}

/// Runs `cmd` as a supervised child (stdin closed, stdout as `cmd` sets it, by default ours,
/// stderr captured) and returns the result it sent with [`serve`].
pub fn run<T: DeserializeOwned>(mut cmd: Command) -> Result<T, ChildError> {
    let dir = tempfile::tempdir()
        .context("creating a directory for the child's outcome")
        .map_err(ChildError::Supervisor)?;
    let outcome_path = dir.path().join("outcome.json");
    cmd.env(OUTCOME_ENV, &outcome_path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .spawn()
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("running {program} as a child process"))
        .map_err(ChildError::Supervisor)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let outcome = match std::fs::read(&outcome_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ChildError::Died {
                how: describe_exit(&out.status),
                log_tail: log_tail(&stderr),
            })
        }
        Err(e) => {
            return Err(ChildError::Supervisor(anyhow!(e).context(format!(
                "reading the child's outcome {}",
                outcome_path.display()
            ))))
        }
    };
    eprint!("{stderr}");
    match serde_json::from_slice::<Outcome<T>>(&outcome) {
        Ok(Outcome::Done(result)) => Ok(result),
        Ok(Outcome::Failed(message)) => Err(ChildError::Failed(message)),
        Err(e) => Err(ChildError::Supervisor(anyhow!(e).context(format!(
            "the child's outcome {} is not what it should be",
            outcome_path.display()
        )))),
    }
}

/// Runs `work`. In a child that [`run`] started, sends its outcome to the parent and exits (status
/// 0 when it succeeded, 1 when it failed, 2 when the outcome could not be written); in any other
/// process, returns `work`'s result.
pub fn serve<T: Serialize>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(path) = std::env::var_os(OUTCOME_ENV).filter(|p| !p.is_empty()) else {
        return work();
    };
    let outcome = match work() {
        Ok(result) => Outcome::Done(result),
        Err(e) => Outcome::Failed(format!("{e:#}")),
    };
    let status = match &outcome {
        Outcome::Done(_) => 0,
        Outcome::Failed(_) => 1,
    };
    if let Err(e) = send(Path::new(&path), &outcome) {
        eprintln!("error: cannot send the outcome to the parent process: {e:#}");
        std::process::exit(2);
    }
    std::process::exit(status);
}

/// Writes the outcome next to `path` and renames it there, so the parent reads all of it or none.
fn send<T: Serialize>(path: &Path, outcome: &Outcome<T>) -> Result<()> {
    let json = serde_json::to_vec(outcome).context("encoding the outcome")?;
    let mut partial = PathBuf::from(path);
    partial.set_extension("partial");
    std::fs::write(&partial, json).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))
}

fn log_tail(stderr: &str) -> Vec<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[start..].iter().map(|l| l.to_string()).collect()
}

/// How a process ended, in words: `was killed by SIGABRT (6)`, `exited with status 3`.
pub fn describe_exit(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                6 => "SIGABRT",
                8 => "SIGFPE",
                9 => "SIGKILL",
                11 => "SIGSEGV",
                15 => "SIGTERM",
                _ => "signal",
            };
            return format!("was killed by {name} ({sig})");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "ended abnormally".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell child running `script`.
    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    /// This test binary re-run as a child that runs only the ignored test `name` below.
    fn this_test_as_child(name: &str) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            &format!("supervise::tests::{name}"),
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        cmd.stdout(Stdio::null());
        cmd
    }

    #[test]
    #[ignore = "run as a child by serve_sends_the_result_and_the_error"]
    fn child_that_succeeds() {
        if std::env::var_os(OUTCOME_ENV).is_none() {
            return; // run by hand with --ignored: nothing to serve
        }
        let _ = serve(|| Ok(vec![4u32, 2]));
        unreachable!("serve exits in a supervised child");
    }

    #[test]
    #[ignore = "run as a child by serve_sends_the_result_and_the_error"]
    fn child_that_fails() {
        if std::env::var_os(OUTCOME_ENV).is_none() {
            return;
        }
        let _: Result<()> = serve(|| Err(anyhow!("the plugin said no")).context("compiling"));
        unreachable!("serve exits in a supervised child");
    }

    #[test]
    fn serve_sends_the_result_and_the_error() {
        let got: Vec<u32> = run(this_test_as_child("child_that_succeeds")).unwrap();
        assert_eq!(got, [4, 2]);
        match run::<()>(this_test_as_child("child_that_fails")) {
            Err(ChildError::Failed(m)) => assert_eq!(m, "compiling: the plugin said no"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serve_outside_a_supervised_child_returns_the_result() {
        if std::env::var_os(OUTCOME_ENV).is_none() {
            assert_eq!(serve(|| Ok(7)).unwrap(), 7);
        }
    }

    #[test]
    fn a_child_killed_by_a_signal_is_named_with_its_log() {
        for (signal, name) in [
            ("ABRT", "SIGABRT (6)"),
            ("SEGV", "SIGSEGV (11)"),
            ("TERM", "SIGTERM (15)"),
        ] {
            // No core file from the abort.
            let script =
                format!("ulimit -c 0; echo 'plugin: F0101 check failed' >&2; kill -{signal} $$");
            match run::<()>(sh(&script)) {
                Err(e @ ChildError::Died { .. }) => {
                    let ChildError::Died { how, log_tail } = &e else {
                        unreachable!()
                    };
                    assert_eq!(how, &format!("was killed by {name}"));
                    assert_eq!(log_tail, &["plugin: F0101 check failed"]);
                    let text = e.to_string();
                    assert!(text.contains(name) && text.contains("F0101"), "{text}");
                }
                other => panic!("{signal}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_child_that_exits_without_answering_keeps_its_last_lines() {
        let script = "i=0; while [ $i -lt 30 ]; do echo line $i >&2; i=$((i+1)); done; exit 3";
        match run::<()>(sh(script)) {
            Err(ChildError::Died { how, log_tail }) => {
                assert_eq!(how, "exited with status 3");
                assert_eq!(log_tail.len(), 20);
                assert_eq!(log_tail.first().unwrap(), "line 10");
                assert_eq!(log_tail.last().unwrap(), "line 29");
            }
            other => panic!("{other:?}"),
        }
        match run::<()>(sh("exit 0")) {
            Err(ChildError::Died { how, log_tail }) => {
                assert_eq!(how, "exited with status 0");
                assert_eq!(log_tail_text(&log_tail), "(none)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unreadable_outcome_is_the_supervisors_error() {
        match run::<u32>(sh("echo 'not json' > \"$RATTN_CHILD_OUTCOME\"")) {
            Err(ChildError::Supervisor(e)) => {
                assert!(format!("{e:#}").contains("outcome"), "{e:#}")
            }
            other => panic!("{other:?}"),
        }
        match run::<()>(Command::new("/nonexistent/rattn-child")) {
            Err(ChildError::Supervisor(e)) => {
                assert!(
                    format!("{e:#}").contains("/nonexistent/rattn-child"),
                    "{e:#}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
