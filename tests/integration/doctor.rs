//! `tie doctor` reports this host's real values: each one is checked here against the kernel
//! file it comes from.

use std::process::Command;

use crate::common::scratch_dir;

/// `tie doctor --config` of `config`, with `args`; its exit status is the caller's to check.
fn doctor_status(config: &str, args: &[&str]) -> std::process::Output {
    let dir = scratch_dir("doctor");
    let path = dir.join("tie.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tie"))
        .args(["doctor", "--config"])
        .arg(&path)
        .args(args)
        .output()
        .unwrap()
}

/// `tie doctor` of a valid config, which must exit 0 (nothing fails, warnings are not
/// errors without `--strict`).
fn doctor(config: &str, json: bool) -> std::process::Output {
    let out = doctor_status(config, if json { &["--json"] } else { &[] });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The check named `name` in the output `out` of `tie doctor --json`.
fn check_named(out: &std::process::Output, name: &str) -> serde_json::Value {
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    checks
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no check {name:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

#[test]
fn an_invalid_config_is_a_failed_check_and_the_others_still_run() {
    let checks = |out: &std::process::Output| -> Vec<serde_json::Value> {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // A core this host lacks: the config fails, the host is still checked (its cores too).
    let out = doctor_status("[server]\npoller_cores = [0, 100000]\n", &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let all = checks(&out);
    assert_eq!(all[0]["name"], "config");
    assert_eq!(all[0]["verdict"], "fail");
    assert!(
        all[0]["value"]
            .as_str()
            .unwrap()
            .contains("server.poller_cores = 100000: no such core"),
        "{}",
        all[0]
    );
    let isolated = all.iter().find(|c| c["name"] == "isolated cores").unwrap();
    assert!(
        isolated["value"].as_str().unwrap().contains("100000"),
        "{isolated}"
    );
    assert!(all.len() > 5, "{all:?}");
    // TOML that does not parse: the defaults are checked.
    let out = doctor_status("[server]\nidle = \"park\"\n", &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let all = checks(&out);
    // Which repository it names is not known then.
    let repository = check_named(&out, "model repository");
    assert_eq!(repository["verdict"], "unknown", "{repository}");
    assert!(
        all[0]["value"]
            .as_str()
            .unwrap()
            .contains("unknown variant `park`"),
        "{}",
        all[0]
    );
    assert!(all.len() > 5);
    // A valid config: exit 0; with --strict, exit 1 exactly when a check warns.
    let out = doctor_status("", &["--json"]);
    assert!(out.status.success());
    let all = checks(&out);
    assert_eq!(all[0]["verdict"], "ok");
    let warns = all.iter().any(|c| c["verdict"] == "warn");
    let strict = doctor_status("", &["--json", "--strict"]);
    assert_eq!(strict.status.success(), !warns, "{all:?}");
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn doctor_reports_the_hosts_real_values() {
    // Core 0 exists on every host (poller cores are checked against the online CPUs).
    let out = doctor("[server]\npoller_cores = [0]\n", true);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))
            .clone()
    };
    for c in &checks {
        let verdict = c["verdict"].as_str().unwrap();
        assert!(["ok", "warn", "unknown", "fail"].contains(&verdict), "{c}");
        // A warning always says what to do.
        assert_eq!(
            verdict == "warn",
            !c["fix"].as_str().unwrap().is_empty(),
            "{c}"
        );
    }
    assert_eq!(
        get("huge pages for segments")["value"],
        "not used (server.huge_pages = false)"
    );
    // Huge pages asked for: none free fails the check (tie serve would refuse to start). The
    // pool is read before and after, and compared only when it did not change meanwhile (the
    // huge-pages tests change it).
    let before = read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
    let out = doctor_status("[server]\nhuge_pages = true\n", &["--json"]);
    let after = read("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
    let c = check_named(&out, "huge pages for segments");
    let value = c["value"].as_str().unwrap();
    let free = value.split(' ').next().unwrap();
    if c["verdict"] != "unknown" {
        assert_eq!(c["verdict"] == "fail", free == "0", "{c}");
        assert_eq!(out.status.code(), Some(i32::from(free == "0")), "{c}");
    }
    if let (Some(before), Some(after)) = (before, after) {
        if before == after {
            assert_eq!(free, before, "{c}");
        }
    }
    if let Some(source) = read("/sys/devices/system/clocksource/clocksource0/current_clocksource") {
        let c = get("clock source");
        assert_eq!(c["value"], source.as_str());
        assert_eq!(
            c["verdict"] == "ok",
            source == "tsc" || source == "kvm-clock",
            "{c}"
        );
    }
    if let Some(thp) = read("/sys/kernel/mm/transparent_hugepage/enabled") {
        let c = get("transparent huge pages");
        assert!(
            thp.contains(&format!("[{}]", c["value"].as_str().unwrap())),
            "{c} vs {thp}"
        );
    }
    if let Some(isolated) = read("/sys/devices/system/cpu/isolated") {
        let c = get("isolated cores");
        let core0_isolated = tie::host::parse_cpu_list(&isolated).contains(&0);
        assert_eq!(c["verdict"] == "ok", core0_isolated, "{c} vs {isolated:?}");
    }
    // The memlock limit, as the shell sees it.
    let ulimit = Command::new("sh")
        .args(["-c", "ulimit -l"])
        .output()
        .unwrap();
    let ulimit = String::from_utf8_lossy(&ulimit.stdout).trim().to_string();
    let c = get("memlock limit (this process)");
    if ulimit == "unlimited" {
        assert_eq!(c["value"], "unlimited");
    } else {
        let kb: u64 = ulimit.parse().unwrap();
        let value = c["value"].as_str().unwrap();
        assert!(value.starts_with(&format!("{} MB", kb >> 10)), "{c}");
        // Root is exempt, and told so; still a warning (the server's user may not be root).
        assert_eq!(
            value.contains("root"),
            rustix::process::geteuid().is_root(),
            "{c}"
        );
        assert_eq!(c["verdict"], "warn", "{c}");
        // With lock_memory, a limit tie serve would refuse (not root) fails the check.
        let out = doctor_status("[server]\nlock_memory = true\n", &["--json"]);
        let c = check_named(&out, "memlock limit (this process)");
        let refused = !rustix::process::geteuid().is_root();
        assert_eq!(c["verdict"] == "fail", refused, "{c}");
        if refused {
            assert_eq!(out.status.code(), Some(1), "{c}");
        }
    }
    if let Some(siblings) = read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") {
        let shared = tie::host::parse_cpu_list(&siblings).len() > 1;
        assert_eq!(
            get("SMT siblings of poller cores")["verdict"] == "warn",
            shared
        );
    }
    let gpu = get("GPU");
    assert!(!gpu["value"].as_str().unwrap().is_empty());
}

#[test]
fn doctor_text_output_gives_the_fix_under_each_warning() {
    let out = doctor("", false);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().any(|l| l.contains("clock source")), "{text}");
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("WARN") {
            assert!(lines[i + 1].trim_start().starts_with("fix: "), "{text}");
        }
    }
}

#[test]
fn an_api_token_file_tie_serve_cannot_read_fails_the_check() {
    let dir = scratch_dir("doctor-token");
    let missing = dir.join("no-such-token");
    let out = doctor_status(
        &format!("[server]\napi_token_file = {missing:?}\n"),
        &["--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(checks[0]["verdict"], "ok", "the config itself is valid");
    let c = check_named(&out, "api token file");
    assert_eq!(c["verdict"], "fail");
    let value = c["value"].as_str().unwrap();
    assert!(
        value.contains("server.api_token_file") && value.contains("no-such-token"),
        "{c}"
    );
    // Empty: refused too. With a token: fine.
    let file = dir.join("token");
    std::fs::write(&file, "  \n").unwrap();
    let config = format!("[server]\napi_token_file = {file:?}\n");
    assert_eq!(doctor_status(&config, &[]).status.code(), Some(1));
    std::fs::write(&file, "s3cret\n").unwrap();
    let out = doctor_status(&config, &["--json"]);
    let c = check_named(&out, "api token file");
    assert_eq!(c["verdict"], "ok", "{c}");
    assert!(
        !out.stdout.windows(6).any(|w| w == b"s3cret"),
        "the token is never shown"
    );
    // No file configured: no check.
    let out = doctor_status("", &["--json"]);
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(checks.iter().all(|c| c["name"] != "api token file"));
}

#[test]
fn a_model_tie_serve_would_refuse_fails_the_repository_check() {
    let repo = scratch_dir("doctor-repo");
    // Model `name`, version 1: mlp64's file.
    let add_model = |name: &str| {
        std::fs::create_dir_all(repo.join(name).join("1")).unwrap();
        std::fs::copy(
            crate::common::root().join("models/mlp64/1/model.onnx"),
            repo.join(name).join("1/model.onnx"),
        )
        .unwrap();
    };
    add_model("good");
    add_model("bad");
    std::fs::write(
        repo.join("bad/config.toml"),
        "layout = \"no-such-layout\"\n",
    )
    .unwrap();
    let config = |extra: &str| format!("[server]\nmodel_repository = {repo:?}\n{extra}");
    let repository_check = |config: &str| {
        let out = doctor_status(config, &["--json"]);
        (out.status.code(), check_named(&out, "model repository"))
    };
    // A layout file that is not there: tie serve refuses the model, and so the start.
    let (code, c) = repository_check(&config(""));
    assert_eq!(code, Some(1), "{c}");
    assert_eq!(c["verdict"], "fail", "{c}");
    let value = c["value"].as_str().unwrap();
    assert!(
        value.contains("1 model to load") && value.contains("no-such-layout"),
        "{c}"
    );
    let dir = scratch_dir("doctor-serve");
    std::fs::write(dir.join("tie.toml"), config("")).unwrap();
    let (status, stderr) = crate::common::fails_within(
        Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(crate::common::root())
            .args(["serve", "--http-addr", "127.0.0.1:0", "--config"])
            .arg(dir.join("tie.toml"))
            .arg("--socket-dir")
            .arg(&dir),
    );
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("no-such-layout"), "{stderr}");
    // Served without it when a failed model does not stop the start: a warning.
    let lenient = config("[model_deployment]\nexit_on_error = false\n");
    let (code, c) = repository_check(&lenient);
    assert_eq!(
        (code, c["verdict"].as_str()),
        (Some(0), Some("warn")),
        "{c}"
    );
    // Nothing else to serve: a failure again.
    std::fs::remove_dir_all(repo.join("good")).unwrap();
    let (code, c) = repository_check(&lenient);
    assert_eq!(
        (code, c["verdict"].as_str()),
        (Some(1), Some("fail")),
        "{c}"
    );
    // Both models correct: fine, each counted.
    std::fs::write(repo.join("bad/config.toml"), "").unwrap();
    add_model("other");
    // One with a layout that is there, found in the configured layouts directory.
    std::fs::write(repo.join("other/config.toml"), "layout = \"mlp64\"\n").unwrap();
    let layouts = crate::common::root().join("layouts/features");
    let with_layouts = config(&format!("layouts_dir = {layouts:?}\n"));
    let (code, c) = repository_check(&with_layouts);
    assert_eq!((code, c["verdict"].as_str()), (Some(0), Some("ok")), "{c}");
    assert!(
        c["value"].as_str().unwrap().contains("2 models to load"),
        "{c}"
    );
    // A routing.toml tie serve cannot read stops its start.
    std::fs::write(repo.join("routing.toml"), "[routes\n").unwrap();
    let (code, c) = repository_check(&with_layouts);
    assert_eq!(
        (code, c["verdict"].as_str()),
        (Some(1), Some("fail")),
        "{c}"
    );
    assert!(c["value"].as_str().unwrap().contains("routing"), "{c}");
}
