//! Python venvs under the target directory, made once and shared by test
//! binaries (Autobahn's kosoku, interop's `websockets`).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{require_tool, runs_ok, target_dir};

/// `<target>/NAME`, where [`python_venv`] puts the venv called `name`.
pub fn venv_dir(name: &str) -> PathBuf {
    target_dir().join(name)
}

/// `VENV/bin/python`.
pub fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// An exclusive lock on a file (released when dropped), so that tests running
/// at the same time, in one binary or several, do not build a venv twice.
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", path.display()));
        loop {
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return FileLock(file);
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                panic!("cannot lock {}: {err}", path.display());
            }
        }
    }
}

/// Makes (once) the venv `<target>/NAME` with `requirement` (a pip
/// requirement such as `pkg==1.2.3`) installed, and returns its directory.
///
/// Holds the lock file `<target>/NAME.lock` throughout. The venv is reused
/// when its Python runs and `ready(venv)` holds; a venv whose Python does not
/// run (missing, half-made, or pointing at an interpreter that is gone) is
/// removed and made again; then `requirement` is pip-installed and `ready`
/// must hold. Returns `None` when `python3` or its venv module is missing and
/// `CI` is not `true` (the caller skips, after a loud warning); panics under
/// `CI=true`, and whenever pip fails.
pub fn python_venv(name: &str, requirement: &str, ready: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let target = target_dir();
    fs::create_dir_all(&target).unwrap_or_else(|e| panic!("cannot create {}: {e}", target.display()));
    let _lock = FileLock::acquire(&target.join(format!("{name}.lock")));
    let venv = venv_dir(name);
    let python = venv_python(&venv);

    let python_works = runs_ok(Command::new(&python).args(["-c", ""]));
    if python_works && ready(&venv) {
        return Some(venv);
    }

    let have_python = runs_ok(Command::new("python3").arg("--version"));
    if !require_tool("python3", have_python) {
        return None;
    }
    if !python_works {
        if venv.exists() {
            fs::remove_dir_all(&venv).unwrap_or_else(|e| panic!("cannot remove {}: {e}", venv.display()));
        }
        eprintln!("{name}: creating venv {}", venv.display());
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 -m venv: {e}"));
        if !out.status.success() {
            eprintln!(
                "`python3 -m venv {}` failed ({}):\n{}{}",
                venv.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = fs::remove_dir_all(&venv);
            require_tool("python3-venv (`python3 -m venv` with pip)", false);
            return None;
        }
    }

    eprintln!("{name}: pip install {requirement} into {}", venv.display());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ])
        .arg(requirement)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run pip in {}: {e}", venv.display()));
    assert!(
        out.status.success(),
        "pip install {requirement} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        ready(&venv),
        "{} is not ready after pip install {requirement}:\n{}{}",
        venv.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(venv)
}
