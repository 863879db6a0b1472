//! Parser for nvcc's `-Xptxas -v` report: per kernel and architecture, registers, stack frame,
//! spills and shared memory. The build keeps the report (`LK_PTXAS_REPORT`), and a test fails when
//! any kernel spills registers or has a stack frame.

/// What ptxas reported for one compiled function on one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Mangled name.
    pub name: String,
    /// e.g. `sm_90`.
    pub arch: String,
    pub registers: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub shared_bytes: u32,
}

impl KernelResources {
    /// Spills or a stack frame: local memory traffic in what should be a register-only kernel.
    pub fn uses_local_memory(&self) -> bool {
        self.stack_frame_bytes > 0 || self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Parses the report. Recognised lines (ptxas 12/13):
/// `ptxas info    : Compiling entry function '_Z…' for 'sm_90'`,
/// `ptxas info    : Function properties for _Z…`,
/// `    N bytes stack frame, N bytes spill stores, N bytes spill loads`,
/// `ptxas info    : Used N registers, used N barriers, N bytes smem, …`.
pub fn parse_report(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut current_arch = String::new();
    let mut properties_for: Option<String> = None;
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            current_arch = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or_default()
                .to_string();
            out.push(KernelResources {
                name,
                arch: current_arch.clone(),
                ..Default::default()
            });
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            properties_for = Some(rest.trim().to_string());
        } else if line.contains("bytes stack frame") {
            let target = properties_for.take();
            let entry = match target {
                Some(name) => match out
                    .iter_mut()
                    .rev()
                    .find(|k| k.name == name && k.arch == current_arch)
                {
                    Some(k) => k,
                    None => {
                        // A non-entry (device) function: tracked too, it can spill as well.
                        out.push(KernelResources {
                            name,
                            arch: current_arch.clone(),
                            ..Default::default()
                        });
                        out.last_mut().unwrap()
                    }
                },
                None => continue,
            };
            entry.stack_frame_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            entry.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            entry.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(k) = out.last_mut() {
                k.registers = number_before(line, " registers").unwrap_or(0);
                k.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}
