//! Shared by the benchmarks: percentiles, the machine line of a report,
//! and writing a report into its section of `docs/performance.md`.

#![allow(dead_code)]

/// The value at fraction `p` (0..=1) of `sorted` (ascending, not empty),
/// by nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Sorts `values` and returns its median (`NaN` if empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    percentile(values, 0.5)
}

/// The header of a Markdown table with a `scenario` column and one column
/// per name of a time split (`vcpu_stop_ms` becomes "vcpu stop").
pub fn split_header(names: &[&str]) -> String {
    format!(
        "| scenario | {} |\n|---|{}\n",
        names
            .iter()
            .map(|s| s.trim_end_matches("_ms").replace('_', " "))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(names.len())
    )
}

/// `Machine: <n> host CPUs, Linux <release>, KVM <with|without hardware
/// virtualization ...>.`
pub fn machine_line() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kvm_kind = if std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" vmx") || c.contains(" svm"))
        .unwrap_or(false)
    {
        "with hardware virtualization"
    } else {
        "without hardware virtualization (instruction emulator)"
    };
    format!(
        "Machine: {cpus} host CPUs, Linux {}, KVM {kvm_kind}.",
        host.trim()
    )
}

/// Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`
/// in docs/performance.md.
pub fn write_docs_section(name: &str, body: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/performance.md");
    let Ok(doc) = std::fs::read_to_string(path) else {
        eprintln!("{path} not found; report not written");
        return;
    };
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    match (doc.find(&open), doc.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            let new = format!("{}{open}\n{body}{}", &doc[..a], &doc[b..]);
            if let Err(e) = std::fs::write(path, new) {
                eprintln!("cannot update {path}: {e}");
            }
        }
        _ => eprintln!("markers for {name} not found in {path}; report not written"),
    }
}

/// Today's date in UTC, `YYYY-MM-DD`.
pub fn date_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days to civil date (proleptic Gregorian), after Howard Hinnant's
    // `civil_from_days`.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The path of `file` in the repository's `docs/` directory.
pub fn docs_path(file: &str) -> std::path::PathBuf {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs")).join(file)
}
