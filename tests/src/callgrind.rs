//! Instructions counted by valgrind's callgrind in a running Envoy: deterministic to about 0.3%
//! for the same binary and load, whatever else the machine does, where CPU time on a shared VM
//! moves by tens of percent. Envoy runs under valgrind from its start; the counters are zeroed
//! after a warm-up (`callgrind_control -z`) and dumped after the measured requests
//! (`callgrind_control -d`), so that the count is theirs alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The command that runs Envoy under callgrind, writing its dumps into `dir`. Instrumentation
/// starts at once, so that `callgrind_control` can zero and dump; the JIT code of the Wasm VM is
/// checked for changes (`--smc-check`) as V8 writes it.
pub fn wrapper(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--smc-check=all-non-file".into(),
        format!("--callgrind-out-file={}", dir.join("callgrind.out").display()),
    ]
}

/// Zero the counters of the callgrind process `pid`.
pub fn zero(pid: u32) -> Result<(), String> {
    control(pid, "-z")
}

/// Dump the counters of `pid` into `dir` and return the instructions counted since they were
/// last zeroed.
pub fn dump(pid: u32, dir: &Path) -> Result<u64, String> {
    control(pid, "-d")?;
    let newest = newest_dump(dir).ok_or_else(|| format!("no callgrind dump in {}", dir.display()))?;
    let text = fs::read_to_string(&newest).map_err(|e| format!("{}: {e}", newest.display()))?;
    total(&text).ok_or_else(|| format!("{}: no totals line", newest.display()))
}

fn control(pid: u32, flag: &str) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .output()
        .map_err(|e| format!("callgrind_control (apt-get install valgrind): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The dump with the highest part number (`callgrind.out.N`).
fn newest_dump(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let part = p.file_name()?.to_str()?.strip_prefix("callgrind.out.")?.parse::<u64>().ok()?;
            Some((part, p))
        })
        .max_by_key(|(part, _)| *part)
        .map(|(_, p)| p)
}

/// The event total of a callgrind dump (its `totals:` line, or `summary:` in older formats);
/// with the default event set, instructions executed (Ir).
fn total(dump: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_totals_of_a_dump() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\ncmd: envoy\npart: 2\n\nevents: Ir\n\nfn=(1) main\n5 10\n\ntotals: 480000123\n";
        assert_eq!(total(dump), Some(480_000_123));
        assert_eq!(total("events: Ir\nsummary: 77\n"), Some(77));
        assert_eq!(total("events: Ir\n"), None);
    }
}
