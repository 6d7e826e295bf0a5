//! `server.huge_pages`: session segments on 2 MB huge pages (hugetlbfs).

use crate::common::Need;
use crate::common::{fixture, root, TestServer, TEST_CONFIG};
use tie_client::Client;

const NR: &str = "/proc/sys/vm/nr_hugepages";
const FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

fn number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Puts `vm.nr_hugepages` back as it was.
struct Restore(Option<u64>);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            let _ = std::fs::write(NR, n.to_string());
        }
    }
}

fn on_hugetlbfs(client: &Client) -> bool {
    let fs = rustix::fs::fstatfs(client.segment().fd()).unwrap();
    fs.f_type as u64 & 0xffff_ffff == HUGETLBFS_MAGIC
}

#[test]
fn segments_go_on_huge_pages_when_configured() {
    let config = TEST_CONFIG.replacen("[server]\n", "[server]\nhuge_pages = true\n", 1);
    assert!(config.contains("huge_pages"));
    let before = number(NR).unwrap_or(0);
    let free = number(FREE).unwrap_or(0);
    // As root the pool is set to leave exactly 0, then 1, page free (restored after).
    let mut restore = Restore(None);
    let resizable = std::fs::write(NR, before.to_string()).is_ok();
    if resizable {
        restore.0 = Some(before);
        let used = before - free;
        std::fs::write(NR, used.to_string()).unwrap();
        // No free page: the server refuses to start, saying what to do.
        let dir = crate::common::scratch_dir("no-huge-pages");
        std::fs::write(dir.join("tie.toml"), &config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tie"))
            .current_dir(root())
            .args(["serve", "--config"])
            .arg(dir.join("tie.toml"))
            .args(["--http-addr", "127.0.0.1:0", "--endpoint", "test"])
            .arg("--socket-dir")
            .arg(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with no huge page free");
        assert!(err.contains("vm.nr_hugepages"), "{err}");
        std::fs::write(NR, (used + 1).to_string()).unwrap();
        if number(FREE) != Some(1) {
            crate::common::skip(
                Need::HugePages,
                "the kernel would not reserve a 2 MB huge page",
            );
            return;
        }
    } else if free == 0 {
        crate::common::skip(
            Need::Root,
            "no free 2 MB huge page, and vm.nr_hugepages needs root to reserve one",
        );
        return;
    }
    let server = TestServer::start_with(&config, &root().join("models"));
    let f = fixture("mlp64_v1");
    let check = |client: &mut Client| {
        let p = client.predict(&f.inputs[0]).unwrap();
        assert!((p.outputs()[0] - f.outputs[0][0]).abs() <= 1e-4 * f.outputs[0][0].abs().max(1.0));
    };
    let mut first = Client::connect("test", "mlp64", server.options()).unwrap();
    check(&mut first);
    assert!(on_hugetlbfs(&first), "not on hugetlbfs");
    assert_eq!(first.segment().info().segment_size % (2 << 20), 0);
    assert!(!server.log().contains("ordinary pages"), "{}", server.log());
    if resizable {
        // The pool is empty now: the next session is served on ordinary pages, and says so.
        let mut second = Client::connect("test", "mlp64", server.options()).unwrap();
        check(&mut second);
        assert!(!on_hugetlbfs(&second));
        assert!(
            server.log().contains("ordinary pages used"),
            "{}",
            server.log()
        );
        check(&mut first);
    }
    drop(first);
    drop(server);
    drop(restore);
}
