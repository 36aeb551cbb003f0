//! Traces: a cluster (nodes with their GPUs) and a list of tasks, read from CSV files.
//!
//! # The CSV format
//! Two files, each with a header line naming its columns (in any order; unknown columns are
//! ignored). Fields are separated by commas and may not be quoted or contain commas; blank lines
//! are skipped. Numbers are non-negative integers.
//!
//! Nodes (`openb_node_list_gpu_node.csv` in openb):
//!
//! | column | meaning |
//! |---|---|
//! | `sn` or `name` | unique node name |
//! | `cpu_milli` | milli-cores |
//! | `memory_mib` | memory in MiB |
//! | `gpu` | number of GPUs (each split into 1000 milli-GPU) |
//! | `model` | GPU model, e.g. `V100M32` (may be empty for nodes without GPUs) |
//!
//! Tasks (`openb_pod_list_default.csv` in openb):
//!
//! | column | meaning |
//! |---|---|
//! | `name` | unique task name |
//! | `cpu_milli` | milli-cores |
//! | `memory_mib` | memory in MiB |
//! | `num_gpu` | GPUs: 0 (cpu only), 1, or more (whole GPUs) |
//! | `gpu_milli` | share of each GPU: 0 with `num_gpu` 0; 1..=1000 with 1 (below 1000 is a share of one GPU); 1000 with more |
//! | `gpu_spec` | optional: GPU models the task accepts, separated by `\|` (empty: any) |
//! | `creation_time`, `deletion_time` | optional: seconds; for replays in the trace's own time (empty: at the start / never) |
//!
//! A row that breaks these rules is refused with the file, line, column and field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use orch_scheduler::plugins::gpu::{Shape, TargetWorkload};

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The file could not be read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A row (or the header) breaks the format.
    #[error("{}:{line}:{column}: {field}: {reason}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column (character), from 1.
        column: usize,
        /// The column's name (or `header`, `row`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// A node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Unique name.
    pub name: String,
    /// Milli-cores.
    pub cpu_milli: i64,
    /// Memory, MiB.
    pub memory_mib: i64,
    /// GPUs.
    pub gpus: u32,
    /// GPU model.
    pub model: String,
}

/// The kinds of task the paper counts apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskKind {
    /// No GPU.
    Cpu,
    /// A share of one GPU.
    Share,
    /// One or more whole GPUs.
    Whole,
}

impl TaskKind {
    /// The three kinds, in the order the CSV columns list them.
    pub const ALL: [TaskKind; 3] = [TaskKind::Cpu, TaskKind::Share, TaskKind::Whole];

    /// Index into [`Step::placed`](crate::Step::placed) and [`Step::failed`](crate::Step::failed).
    pub fn index(self) -> usize {
        self as usize
    }

    /// `cpu`, `share` or `whole`.
    pub fn label(self) -> &'static str {
        match self {
            TaskKind::Cpu => "cpu",
            TaskKind::Share => "share",
            TaskKind::Whole => "whole",
        }
    }
}

/// A task of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// Unique name.
    pub name: String,
    /// Milli-cores.
    pub cpu_milli: i64,
    /// Memory, MiB.
    pub memory_mib: i64,
    /// GPUs.
    pub num_gpu: u32,
    /// Milli-GPU on each GPU.
    pub gpu_milli: i64,
    /// Accepted GPU models (empty: any).
    pub gpu_spec: Vec<String>,
    /// Arrival, seconds (when the trace has it).
    pub creation: Option<u64>,
    /// Departure, seconds (when the trace has it).
    pub deletion: Option<u64>,
}

impl TaskRow {
    /// Cpu only, a GPU share, or whole GPUs.
    pub fn kind(&self) -> TaskKind {
        match (self.num_gpu, self.gpu_milli) {
            (0, _) => TaskKind::Cpu,
            (1, m) if m < 1000 => TaskKind::Share,
            _ => TaskKind::Whole,
        }
    }

    /// Milli-GPU in all (`num_gpu * gpu_milli`).
    pub fn gpu_total(&self) -> i64 {
        self.num_gpu as i64 * self.gpu_milli
    }

    /// Its shape for the fragmentation measure (memory does not count; GPU models only for GPU
    /// tasks).
    pub fn shape(&self) -> Shape {
        if self.num_gpu == 0 {
            return Shape { cpu_milli: self.cpu_milli, gpu_milli: 0, gpus: 0, models: Vec::new() };
        }
        Shape {
            cpu_milli: self.cpu_milli,
            gpu_milli: self.gpu_milli,
            gpus: self.num_gpu,
            models: self.gpu_spec.clone(),
        }
    }
}

/// A cluster and the tasks that arrive on it.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The nodes, in file order.
    pub nodes: Vec<NodeRow>,
    /// The tasks, in file order.
    pub tasks: Vec<TaskRow>,
    /// A short name for tables (the task file's stem, e.g. `openb_pod_list_default`).
    pub name: String,
}

/// The openb node list the FGD paper uses: the 1,213 GPU nodes.
pub const OPENB_NODES: &str = "openb_node_list_gpu_node.csv";

impl Trace {
    /// Reads a node file and a task file.
    pub fn load(nodes: &Path, tasks: &Path) -> Result<Trace, TraceError> {
        let name = tasks.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Trace { nodes: load_nodes(nodes)?, tasks: load_tasks(tasks)?, name })
    }

    /// An openb task list (`default`, `gpushare20`, `multigpu20`, `gpuspec33`, `cpu100`, … or a
    /// file name) on the openb GPU nodes, from `dir`.
    pub fn openb(dir: &Path, variant: &str) -> Result<Trace, TraceError> {
        let file =
            if variant.ends_with(".csv") { variant.to_string() } else { format!("openb_pod_list_{variant}.csv") };
        Trace::load(&dir.join(OPENB_NODES), &dir.join(file))
    }

    /// GPU capacity of the cluster, milli-GPU.
    pub fn gpu_capacity_milli(&self) -> i64 {
        self.nodes.iter().map(|n| n.gpus as i64 * 1000).sum()
    }

    /// What all the tasks ask for in GPUs, milli-GPU.
    pub fn gpu_requested_milli(&self) -> i64 {
        self.tasks.iter().map(TaskRow::gpu_total).sum()
    }

    /// The typical task shapes covering `coverage` of the tasks (0.95 in the paper).
    pub fn typical_shapes(&self, coverage: f64) -> TargetWorkload {
        let mut counts: HashMap<Shape, u64> = HashMap::new();
        for t in &self.tasks {
            *counts.entry(t.shape()).or_default() += 1;
        }
        TargetWorkload::typical(counts, coverage)
    }
}

/// Where the openb trace is: `$ORCH_OPENB_DIR`, else `shared/data/openb` beside the workspace.
pub fn openb_dir() -> PathBuf {
    match std::env::var_os("ORCH_OPENB_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/openb"),
    }
}

/// One CSV file being read: the header's columns and the current line's fields with their
/// columns.
struct Csv<'a> {
    file: &'a Path,
    header: HashMap<String, usize>,
    width: usize,
}

struct Row<'a> {
    line: usize,
    fields: Vec<(usize, &'a str)>,
}

impl<'a> Csv<'a> {
    fn error(&self, line: usize, column: usize, field: &str, reason: impl Into<String>) -> TraceError {
        TraceError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// Splits a line into fields with their starting columns (from 1).
    fn split(line: &str) -> Vec<(usize, &str)> {
        let mut out = Vec::new();
        let mut column = 1;
        for part in line.split(',') {
            let lead = part.chars().take_while(|c| c.is_whitespace()).count();
            out.push((column + lead, part.trim()));
            column += part.chars().count() + 1;
        }
        out
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.get(name).copied()
    }

    fn require(&self, names: &[&str]) -> Result<usize, TraceError> {
        for n in names {
            if let Some(i) = self.column(n) {
                return Ok(i);
            }
        }
        let mut have: Vec<(&String, &usize)> = self.header.iter().collect();
        have.sort_by_key(|(_, i)| **i);
        let have: Vec<&str> = have.iter().map(|(n, _)| n.as_str()).collect();
        Err(self.error(1, 1, "header", format!("missing column {} (it has: {})", names.join(" or "), have.join(", "))))
    }

    fn text<'r>(&self, row: &'r Row<'r>, i: usize) -> &'r str {
        row.fields[i].1
    }

    fn int(&self, row: &Row<'_>, i: usize, name: &str) -> Result<i64, TraceError> {
        let (col, v) = row.fields[i];
        match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(n),
            Ok(n) => Err(self.error(row.line, col, name, format!("must be >= 0 (is {n})"))),
            Err(_) => Err(self.error(row.line, col, name, format!("{v:?} is not an integer"))),
        }
    }

    fn optional_int(&self, row: &Row<'_>, i: Option<usize>, name: &str) -> Result<Option<i64>, TraceError> {
        match i {
            Some(i) if !row.fields[i].1.is_empty() => self.int(row, i, name).map(Some),
            _ => Ok(None),
        }
    }
}

/// Reads `file` into its text.
fn text_of(file: &Path) -> Result<String, TraceError> {
    std::fs::read_to_string(file).map_err(|source| TraceError::Io { file: file.to_path_buf(), source })
}

/// Parses the header and the rows of `text`, the contents of `file`.
fn parse<'a>(file: &'a Path, text: &'a str) -> Result<(Csv<'a>, Vec<Row<'a>>), TraceError> {
    let mut lines = text.lines().enumerate();
    let mut csv = Csv { file, header: HashMap::new(), width: 0 };
    let Some((_, head)) = lines.next() else {
        return Err(csv.error(1, 1, "header", "the file is empty (a header line is needed)"));
    };
    let head = head.trim_start_matches('\u{feff}');
    let fields = Csv::split(head);
    for (i, (col, name)) in fields.iter().enumerate() {
        if name.is_empty() {
            return Err(csv.error(1, *col, "header", format!("column {} has no name", i + 1)));
        }
        if csv.header.insert(name.to_string(), i).is_some() {
            return Err(csv.error(1, *col, "header", format!("column {name:?} is named twice")));
        }
    }
    csv.width = fields.len();
    let mut rows = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let row = Row { line: n + 1, fields: Csv::split(line) };
        if let Some((col, _)) = row.fields.iter().find(|(_, v)| v.contains('"')) {
            return Err(csv.error(row.line, *col, "row", "quoted fields are not supported"));
        }
        if row.fields.len() != csv.width {
            let col = row.fields.get(csv.width).map_or(line.chars().count() + 1, |(c, _)| *c);
            return Err(csv.error(
                row.line,
                col,
                "row",
                format!("has {} fields, the header has {}", row.fields.len(), csv.width),
            ));
        }
        rows.push(row);
    }
    Ok((csv, rows))
}

/// Reads a node file.
pub fn load_nodes(file: &Path) -> Result<Vec<NodeRow>, TraceError> {
    let text = text_of(file)?;
    let (csv, rows) = parse(file, &text)?;
    let name = csv.require(&["sn", "name"])?;
    let cpu = csv.require(&["cpu_milli"])?;
    let mem = csv.require(&["memory_mib"])?;
    let gpu = csv.require(&["gpu"])?;
    let model = csv.require(&["model"])?;
    let mut nodes = Vec::with_capacity(rows.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let g = csv.int(row, gpu, "gpu")?;
        if g > 64 {
            return Err(csv.error(row.line, row.fields[gpu].0, "gpu", format!("at most 64 GPUs a node (is {g})")));
        }
        let n = NodeRow {
            name: csv.text(row, name).to_string(),
            cpu_milli: csv.int(row, cpu, "cpu_milli")?,
            memory_mib: csv.int(row, mem, "memory_mib")?,
            gpus: g as u32,
            model: csv.text(row, model).to_string(),
        };
        if n.name.is_empty() {
            return Err(csv.error(row.line, row.fields[name].0, "name", "is empty"));
        }
        if let Some(first) = seen.insert(n.name.clone(), row.line) {
            return Err(csv.error(
                row.line,
                row.fields[name].0,
                "name",
                format!("{:?} is also on line {first}", n.name),
            ));
        }
        nodes.push(n);
    }
    Ok(nodes)
}

/// Reads a task file.
pub fn load_tasks(file: &Path) -> Result<Vec<TaskRow>, TraceError> {
    let text = text_of(file)?;
    let (csv, rows) = parse(file, &text)?;
    let name = csv.require(&["name"])?;
    let cpu = csv.require(&["cpu_milli"])?;
    let mem = csv.require(&["memory_mib"])?;
    let num = csv.require(&["num_gpu"])?;
    let milli = csv.require(&["gpu_milli"])?;
    let (spec, created, deleted) = (csv.column("gpu_spec"), csv.column("creation_time"), csv.column("deletion_time"));
    let mut tasks = Vec::with_capacity(rows.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let task_name = csv.text(row, name).to_string();
        if task_name.is_empty() {
            return Err(csv.error(row.line, row.fields[name].0, "name", "is empty"));
        }
        let cpu_milli = csv.int(row, cpu, "cpu_milli")?;
        let memory_mib = csv.int(row, mem, "memory_mib")?;
        let num_gpu = csv.int(row, num, "num_gpu")?;
        if num_gpu > 64 {
            return Err(csv.error(row.line, row.fields[num].0, "num_gpu", format!("at most 64 (is {num_gpu})")));
        }
        let gpu_milli = csv.int(row, milli, "gpu_milli")?;
        let ok = match num_gpu {
            0 => gpu_milli == 0,
            1 => (1..=1000).contains(&gpu_milli),
            _ => gpu_milli == 1000,
        };
        if !ok {
            return Err(csv.error(
                row.line,
                row.fields[milli].0,
                "gpu_milli",
                format!(
                    "is the share of each GPU: 0 with num_gpu 0, 1..=1000 with num_gpu 1, 1000 with more (is {gpu_milli} with num_gpu {num_gpu})"
                ),
            ));
        }
        let t = TaskRow {
            name: task_name,
            cpu_milli,
            memory_mib,
            num_gpu: num_gpu as u32,
            gpu_milli,
            gpu_spec: spec
                .map(|i| csv.text(row, i).split('|').filter(|m| !m.is_empty()).map(str::to_string).collect())
                .unwrap_or_default(),
            creation: csv.optional_int(row, created, "creation_time")?.map(|v| v as u64),
            deletion: csv.optional_int(row, deleted, "deletion_time")?.map(|v| v as u64),
        };
        if let Some(first) = seen.insert(t.name.clone(), row.line) {
            return Err(csv.error(
                row.line,
                row.fields[name].0,
                "name",
                format!("{:?} is also on line {first}", t.name),
            ));
        }
        tasks.push(t);
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("orch-workbench-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_a_small_trace() {
        let nodes = write("n.csv", "sn,cpu_milli,memory_mib,gpu,model\nn1,32000,65536,2,T4\n\nn2, 8000 ,1024,0,\n");
        let tasks = write(
            "t.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,creation_time,deletion_time\n\
             a,1000,10,1,500,T4|P100,5,\nb,2000,0,2,1000,,,9\nc,300,1,0,0,,,\n",
        );
        let t = Trace::load(&nodes, &tasks).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[1].cpu_milli, 8000);
        assert_eq!(t.gpu_capacity_milli(), 2000);
        assert_eq!(t.tasks[0].gpu_spec, vec!["T4".to_string(), "P100".to_string()]);
        assert_eq!((t.tasks[0].creation, t.tasks[0].deletion), (Some(5), None));
        assert_eq!(
            t.tasks.iter().map(TaskRow::kind).collect::<Vec<_>>(),
            [TaskKind::Share, TaskKind::Whole, TaskKind::Cpu]
        );
        assert_eq!(t.gpu_requested_milli(), 2500);
        assert_eq!(t.name, "t");
    }

    #[test]
    fn bad_rows_name_file_line_column_and_field() {
        let head = "name,cpu_milli,memory_mib,num_gpu,gpu_milli\n";
        for (body, want) in [
            ("a,1000,10,1,500\nb,1x0,10,0,0\n", ":3:3: cpu_milli: \"1x0\" is not an integer"),
            ("a,1000,10,2,500\n", ":2:13: gpu_milli: is the share of each GPU"),
            ("a,1000,-4,0,0\n", ":2:8: memory_mib: must be >= 0 (is -4)"),
            ("a,1000,10,0,0,7\n", ":2:15: row: has 6 fields, the header has 5"),
            ("a,1000,10,0\n", ":2:12: row: has 4 fields, the header has 5"),
            ("a,1,1,0,0\na,2,2,0,0\n", ":3:1: name: \"a\" is also on line 2"),
            ("\"a\",1,1,0,0\n", ":2:1: row: quoted fields are not supported"),
        ] {
            let p = write("bad.csv", &format!("{head}{body}"));
            let err = load_tasks(&p).unwrap_err().to_string();
            assert!(err.starts_with(&p.display().to_string()), "{err}");
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        let p = write("nohead.csv", "name,cpu_milli\n");
        let err = load_tasks(&p).unwrap_err().to_string();
        assert!(err.contains(":1:1: header: missing column memory_mib"), "even without rows: {err}");
        let p = write("nocol.csv", "name,cpu_milli\na,1\n");
        let err = load_tasks(&p).unwrap_err().to_string();
        assert!(err.contains(":1:1: header: missing column memory_mib (it has: name, cpu_milli)"), "{err}");
        let err = load_nodes(Path::new("/nonexistent/nodes.csv")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/nodes.csv: "), "{err}");
    }
}
