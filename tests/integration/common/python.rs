//! Python tools the tests run (validators, reference clients), installed by the tests
//! themselves into a virtual environment under the target directory: `cargo test` needs
//! only `python3` with `venv` and a package index.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of the environment, locked for this process until the returned file is
/// dropped: concurrent callers (tests of one binary or of several) take turns.
fn locked_root() -> (PathBuf, std::fs::File) {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python");
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join(".lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    (root, lock)
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pip install` into the environment of `bin`, with `args`.
fn pip_install(bin: &Path, args: &[&std::ffi::OsStr]) {
    let what = format!(
        "pip install {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    run(
        Command::new(bin.join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(args),
        &what,
    );
}

/// The `bin` directory of a virtual environment holding `requirements` (pinned `name==x.y`),
/// made on first use. Concurrent callers wait for one install; a failed install fails the
/// test with pip's output.
pub fn python_tools(requirements: &[&str]) -> PathBuf {
    let (root, _lock) = locked_root();
    let venv = root.join("venv");
    let bin = venv.join("bin");
    // Made aside and renamed into place: a half-made environment (no `venv` module, no
    // ensurepip) is never taken for a ready one.
    if !venv.exists() {
        let aside = root.join("venv.partial");
        let _ = std::fs::remove_dir_all(&aside);
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&aside),
            "python3 -m venv (the tests need python3 with venv and pip)",
        );
        std::fs::rename(&aside, &venv).unwrap();
    }
    // One stamp per requirement, inside the environment: what an earlier test installed is
    // not installed again, and a removed environment takes its stamps with it.
    let stamp = |r: &str| venv.join(format!("installed-{r}"));
    let missing: Vec<&str> = requirements
        .iter()
        .copied()
        .filter(|r| !stamp(r).exists())
        .collect();
    if !missing.is_empty() {
        let args: Vec<&std::ffi::OsStr> = missing.iter().map(|r| r.as_ref()).collect();
        pip_install(&bin, &args);
        for r in missing {
            std::fs::write(stamp(r), "").unwrap();
        }
    }
    bin
}

/// The tools' environment with tie's own Python package (`python/`) built from this tree
/// (maturin, dev profile) and installed, and pytest: its `bin` directory. Built and installed
/// once per test process (a reinstall under a running test's feet would break its imports).
pub fn python_client() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(build_python_client).clone()
}

fn build_python_client() -> PathBuf {
    let bin = python_tools(&["maturin==1.16.0", "pytest==9.2.0", "numpy==2.4.6"]);
    let (root, _lock) = locked_root();
    let wheels = root.join("wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    run(
        Command::new(bin.join("maturin"))
            .args(["build", "--profile", "dev", "--locked", "--quiet", "-o"])
            .arg(&wheels)
            .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")),
        "maturin build",
    );
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("a wheel");
    pip_install(
        &bin,
        &[
            "--force-reinstall".as_ref(),
            "--no-deps".as_ref(),
            wheel.as_os_str(),
        ],
    );
    bin
}
