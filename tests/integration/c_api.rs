//! The C API (`capi/`): its conformance program in C, linked statically, and a C++ user,
//! linked against the shared library, both compiled here with the system's compilers and run
//! against a real server.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{fixture, root, scratch_dir, TestServer};

/// The directory holding `libtie_c.a` and `libtie_c.so`, built with the workspace.
fn library_dir() -> PathBuf {
    // This test runs from target/<profile>/deps.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    // deps/ first: cargo copies the libraries up to target/<profile>/ only when tie-capi is
    // built by name, so a copy there may be stale.
    for dir in [deps.clone(), deps.parent().unwrap().to_path_buf()] {
        if dir.join("libtie_c.a").is_file() && dir.join("libtie_c.so").is_file() {
            return dir;
        }
    }
    panic!(
        "libtie_c.a / libtie_c.so not found next to {}: build the workspace (cargo test --workspace)",
        deps.display()
    );
}

fn compile(compiler: &str, args: &[&str], out: &Path) {
    let status = Command::new(compiler)
        .args(args)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(status.success(), "{compiler} {args:?} failed");
}

/// mlp64's fixture as text: a row of 64 features and the expected output per line.
fn fixture_rows(dir: &Path) -> PathBuf {
    let f = fixture("mlp64_v1");
    let mut text = String::new();
    for (input, output) in f.inputs.iter().zip(&f.outputs) {
        for v in input {
            text.push_str(&format!("{v:e} "));
        }
        text.push_str(&format!("{:e}\n", output[0]));
    }
    let path = dir.join("rows.txt");
    std::fs::write(&path, text).unwrap();
    path
}

/// Compiles the conformance program, linked statically.
fn conformance_program(dir: &Path) -> PathBuf {
    let lib = library_dir();
    let exe = dir.join("conformance");
    let include = root().join("capi/include");
    let source = root().join("capi/examples/conformance.c");
    let static_lib = lib.join("libtie_c.a");
    compile(
        "cc",
        &[
            "-std=c11",
            "-Wall",
            "-Werror",
            "-I",
            include.to_str().unwrap(),
            source.to_str().unwrap(),
            static_lib.to_str().unwrap(),
            // What Rust's standard library needs from the system when linked statically.
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ],
        &exe,
    );
    exe
}

#[test]
fn the_c_conformance_program_passes_against_a_server() {
    let dir = scratch_dir("capi-c");
    let exe = conformance_program(&dir);
    let server = TestServer::start();
    let rows = fixture_rows(&dir);
    let out = Command::new(&exe)
        .current_dir(root())
        .arg(server.options().socket_dir.unwrap())
        .arg(&server.endpoint)
        .arg(&rows)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: "), "{stdout}");
}

#[test]
fn through_the_c_api_a_dead_server_answers_pending_requests_disconnected() {
    use std::io::{BufRead, Write};
    let dir = scratch_dir("capi-disconnect");
    let exe = conformance_program(&dir);
    let mut server = TestServer::start();
    let rows = fixture_rows(&dir);
    let mut child = Command::new(&exe)
        .arg(server.options().socket_dir.unwrap())
        .arg(&server.endpoint)
        .arg(&rows)
        .arg("disconnect")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    // Stopped: the request stays in the ring, unanswered.
    server.pause();
    writeln!(stdin).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "submitted");
    // SIGKILL, then reap it.
    server.signal(9);
    let _ = server.stop();
    writeln!(stdin).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success() && line.starts_with("ok: "), "{line}");
}

/// Compiles `capi/examples/predict.cpp`, linked against the shared library.
fn cpp_program(dir: &Path) -> PathBuf {
    let lib = library_dir();
    let exe = dir.join("predict");
    let include = root().join("capi/include");
    let source = root().join("capi/examples/predict.cpp");
    compile(
        "c++",
        &[
            "-std=c++17",
            "-Wall",
            "-Werror",
            "-I",
            include.to_str().unwrap(),
            source.to_str().unwrap(),
            "-L",
            lib.to_str().unwrap(),
            "-ltie_c",
        ],
        &exe,
    );
    exe
}

/// Runs the C++ program against `server`'s `model` on `input` (a row per line): whether it
/// succeeded, and its lines (the outputs of each row).
fn run_cpp(exe: &Path, server: &TestServer, model: &str, input: &str) -> (bool, Vec<String>) {
    use std::io::Write;
    let mut child = Command::new(exe)
        .arg(server.options().socket_dir.unwrap())
        .arg(&server.endpoint)
        .arg(model)
        .env("LD_LIBRARY_PATH", library_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    (out.status.success(), lines)
}

fn rows_text(rows: &[Vec<f32>]) -> String {
    let mut input = String::new();
    for row in rows {
        input.push_str(
            &row.iter()
                .map(|v| format!("{v:e}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        input.push('\n');
    }
    input
}

#[test]
fn a_cpp_program_predicts_through_the_shared_library() {
    let dir = scratch_dir("capi-cpp");
    let exe = cpp_program(&dir);
    let server = TestServer::start();
    let f = fixture("mlp64_v1");
    // A short row: answered with the error, and the program goes on.
    let input = rows_text(&f.inputs) + "1 2 3\n";
    let (ok, lines) = run_cpp(&exe, &server, "mlp64", &input);
    assert!(ok);
    assert_eq!(lines.len(), f.inputs.len() + 1, "{lines:?}");
    for (line, expected) in lines.iter().zip(&f.outputs) {
        let got: f32 = line.trim().parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(
            crate::common::rel_err(got, expected[0]) <= 1e-5,
            "{got} vs {}",
            expected[0]
        );
    }
    assert!(
        lines.last().unwrap().starts_with("error: ") && lines.last().unwrap().contains("64"),
        "{lines:?}"
    );
}

/// Tree models (an ONNX classifier with ZipMap, a native LightGBM file, an XGBoost
/// classifier of 5 classes) through the C API: the outputs of each finite row.
#[test]
fn tree_models_answer_through_the_c_api() {
    let dir = scratch_dir("capi-trees");
    let exe = cpp_program(&dir);
    let server = TestServer::start_with(
        crate::common::TEST_CONFIG,
        &root().join("tests/fixtures/exported"),
    );
    let fixtures = crate::exported::fixtures();
    for model in ["skl_gbc2", "lgbm_native", "xgb_c5"] {
        let f = fixtures.iter().find(|f| f.model == model).unwrap();
        let (ok, lines) = run_cpp(&exe, &server, model, &rows_text(&f.inputs[..16]));
        assert!(ok, "{model}: {lines:?}");
        assert_eq!(lines.len(), 16, "{model}: {lines:?}");
        for (line, want) in lines.iter().zip(&f.expected) {
            let got: Vec<f32> = line
                .split_whitespace()
                .map(|v| v.parse().unwrap_or_else(|_| panic!("{line}")))
                .collect();
            assert_eq!(got.len(), want.len(), "{model}: {line}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    crate::common::rel_err(*g, *w) <= 1e-5,
                    "{model}: {g} against {}'s {w}",
                    f.oracle
                );
            }
        }
    }
}
