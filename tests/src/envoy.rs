//! Real Envoy processes, started on a bootstrap of [`crate::bootstrap`], watched and stopped.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::bootstrap::*;
use crate::{free_port, http_get};

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    /// Admin port.
    pub admin_port: u16,
    dir: PathBuf,
    proxy: Proxy,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// Start Envoy and wait until it is ready; panics with Envoy's log if it is not.
    pub fn start(proxy: &Proxy) -> Envoy {
        Self::try_start(proxy).unwrap_or_else(|log| panic!("Envoy did not become ready:\n{log}"))
    }

    /// Start Envoy; `Err` carries Envoy's log when it exits or does not become ready.
    pub fn try_start(proxy: &Proxy) -> Result<Envoy, String> {
        let dir = std::env::temp_dir().join(format!(
            "meshtel-envoy-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let admin_port = free_port();
        let bootstrap = dir.join("bootstrap.json");
        let wasm = proxy.wasm.clone().unwrap_or_else(wasm_path);
        fs::write(&bootstrap, proxy.bootstrap(admin_port, &wasm, &dir).to_string()).map_err(|e| e.to_string())?;
        if let (true, Some(config)) = (proxy.ecds, &proxy.plugin_config) {
            write_ecds(&dir, proxy, &wasm, config).map_err(|e| e.to_string())?;
        }
        let log = fs::File::create(dir.join("envoy.log")).map_err(|e| e.to_string())?;
        let mut command = match proxy.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(envoy_bin());
                c
            }
            None => Command::new(envoy_bin()),
        };
        // Envoy dies with the thread that started it, also when the test or demo is killed.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .arg("-c")
            .arg(&bootstrap)
            .args(["--concurrency", &proxy.concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn", "--component-log-level", "wasm:info"])
            // Istio's drain settings (istio/istio pkg/envoy/proxy.go): clients are told to go
            // away as soon as a drain starts.
            .args(["--drain-time-s", "45", "--drain-strategy", "immediate"])
            .envs(proxy.vm_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", envoy_bin().display()))?;
        let mut envoy = Envoy { child, admin_port, dir, proxy: proxy.clone() };
        // Under a wrapper such as valgrind Envoy starts some fifty times slower.
        let ready_within = Duration::from_secs(if proxy.wrapper.is_empty() { 30 } else { 600 });
        let deadline = Instant::now() + ready_within;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("Envoy exited with {status}:\n{}", envoy.log()));
            }
            if let Some((200, body)) = http_get(&format!("http://127.0.0.1:{admin_port}/ready")) {
                if body.trim() == "LIVE" {
                    return Ok(envoy);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("Envoy not ready after {ready_within:?}:\n{}", envoy.log()));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory of its bootstrap and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Envoy process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Deliver a new module or `pluginConfig` by ECDS (the proxy must have been started with
    /// [`Proxy::ecds`]) and wait until Envoy took or refused it; returns whether it took it.
    pub fn push_plugin(&self, wasm: &Path, plugin_config: &Value) -> bool {
        assert!(self.proxy.ecds, "the proxy takes meshtel inline, not by ECDS");
        // Envoy counts a refused update in `config_reload` too; `update_success` only counts taken ones.
        let (taken, refused) = (self.ecds_stat("update_success"), self.ecds_stat("update_rejected"));
        write_ecds(&self.dir, &self.proxy, wasm, plugin_config).expect("the ECDS file is written");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ecds_stat("update_success") > taken {
                return true;
            }
            if self.ecds_stat("update_rejected") > refused {
                return false;
            }
            assert!(Instant::now() < deadline, "Envoy neither took nor refused the push\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A counter of meshtel's ECDS subscription (`update_success`, `update_rejected`, ...).
    pub fn ecds_stat(&self, name: &str) -> u64 {
        self.stat(&format!("extension_config_discovery.http_filter.{PLUGIN_FILTER_NAME}.{name}"))
    }

    /// Drain the listeners as Istio's agent does when the pod stops (`POST
    /// /drain_listeners?graceful`): they keep serving while Envoy asks clients to go away.
    pub fn drain_gracefully(&self) {
        let url = format!("http://127.0.0.1:{}/drain_listeners?graceful", self.admin_port);
        let (status, _) = crate::http_post(&url).expect("the admin port answers");
        assert_eq!(status, 200, "drain_listeners");
    }

    /// Send SIGTERM, as the kubelet (through Istio's agent) does at the end of the drain, and
    /// wait until Envoy exits.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    /// Envoy's resident memory, in KiB.
    pub fn rss_kb(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The lines of the listeners' access log ([`Listener::access_log`]) so far.
    pub fn access_log(&self) -> Vec<String> {
        let text = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    /// Everything Envoy logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    /// Wait until Envoy's log holds a line containing `needle` and return the log; panics with
    /// the log after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?} within {timeout:?}\n{log}");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until meshtel's counter `wasmcustom.meshtel.<name>` satisfies `ok` and return it;
    /// panics with the value and Envoy's log after `timeout`.
    pub fn wait_meshtel_stat(&self, name: &str, timeout: Duration, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.stat(&format!("wasmcustom.meshtel.{name}"));
            if ok(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} stuck at {v}\n{}", self.log());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A counter or gauge from `/stats` (e.g. `wasmcustom.meshtel.spans_exported`); 0 if absent.
    pub fn stat(&self, name: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/stats?filter=^{}$", self.admin_port, name.replace('.', "\\."));
        let Some((200, body)) = http_get(&url) else {
            return 0;
        };
        body.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // Every test doubles as a check of the log phase's one evaluation: no traffic a test
        // sends may make it fail (meshtel would read fact by fact: right, but dearer).
        let failed = if std::thread::panicking() { 0 } else { self.stat("wasmcustom.meshtel.cel_evaluations_failed") };
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- Envoy log ({}) ---\n{}", self.dir.display(), self.log());
        } else if failed > 0 {
            panic!("{failed} log-phase CEL evaluations failed:\n{}", self.log());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
