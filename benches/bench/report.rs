//! Figures and the table: each scenario returns named figures (with a target where the issue
//! sets one) and any correctness problems; the report lays them out one row per figure and one
//! column per store, marking each target met (✓) or not (✗).

use std::collections::HashMap;
use std::time::Duration;

use crate::db::StoreKind;

/// A bound a figure should stay within.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

impl Bound {
    fn met(self, v: f64) -> bool {
        match self {
            Bound::AtMost(b) => v <= b,
            Bound::AtLeast(b) => v >= b,
        }
    }

    fn value(self) -> f64 {
        match self {
            Bound::AtMost(b) | Bound::AtLeast(b) => b,
        }
    }

    fn show(self, decimals: usize) -> String {
        match self {
            Bound::AtMost(b) => format!("≤ {}", fmt(b, decimals)),
            Bound::AtLeast(b) => format!("≥ {}", fmt(b, decimals)),
        }
    }
}

/// One measured number.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Scenario number and name, e.g. `1 overhead`.
    pub scenario: &'static str,
    pub name: String,
    pub value: f64,
    pub decimals: usize,
    pub target: Option<Bound>,
}

pub fn figure(
    scenario: &'static str,
    name: impl Into<String>,
    value: f64,
    decimals: usize,
) -> Figure {
    Figure {
        scenario,
        name: name.into(),
        value,
        decimals,
        target: None,
    }
}

impl Figure {
    pub fn at_most(mut self, b: f64) -> Figure {
        self.target = Some(Bound::AtMost(b));
        self
    }

    pub fn at_least(mut self, b: f64) -> Figure {
        self.target = Some(Bound::AtLeast(b));
        self
    }
}

/// What one scenario on one store produced.
#[derive(Debug, Default)]
pub struct Results {
    pub figures: Vec<Figure>,
    /// Correctness failures: a job failed, a checkpointed step was called again, a timeout.
    pub problems: Vec<String>,
    /// Context worth printing under the table (absolute times, CPU split).
    pub notes: Vec<String>,
}

impl Results {
    pub fn push(&mut self, f: Figure) {
        self.figures.push(f);
    }

    /// Record what the server logged at WARN or above: a correctness problem when `fatal`,
    /// otherwise a note.
    pub fn server_warnings(&mut self, scenario: &str, warnings: &[String], fatal: bool) {
        let Some(first) = warnings.first() else {
            return;
        };
        let line = format!(
            "{scenario}: server logged {} warnings, first: {first}",
            warnings.len()
        );
        if fatal {
            self.problems.push(line);
        } else {
            self.notes.push(line);
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub stores: Vec<StoreKind>,
    /// Rows in first-seen order: (scenario, name, target, decimals).
    rows: Vec<(&'static str, String, Option<Bound>, usize)>,
    cells: HashMap<(usize, StoreKind), f64>,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(&mut self, store: StoreKind, results: Results) {
        for f in results.figures {
            let row = match self
                .rows
                .iter()
                .position(|r| r.0 == f.scenario && r.1 == f.name)
            {
                Some(i) => i,
                None => {
                    self.rows.push((f.scenario, f.name, f.target, f.decimals));
                    self.rows.len() - 1
                }
            };
            self.cells.insert((row, store), f.value);
        }
        for p in results.problems {
            self.errors.push(format!("{}: {p}", store.name()));
        }
        for n in results.notes {
            self.notes.push(format!("{}: {n}", store.name()));
        }
    }

    pub fn fail(&mut self, store: StoreKind, scenario: &str, e: &anyhow::Error) {
        self.errors.push(format!(
            "{}: {scenario} did not finish: {e:#}",
            store.name()
        ));
    }

    pub fn markdown(&self, quick: bool, took: Duration) -> String {
        let mut out = String::new();
        if quick {
            out += "Quick run (--quick): small sizes; the figures are not meaningful.\n\n";
        }
        out += "| scenario | figure |";
        for s in &self.stores {
            out += &format!(" {} |", s.name());
        }
        out += " target |\n|---|---|";
        out += &"---:|".repeat(self.stores.len());
        out += "---|\n";
        for (i, (scenario, name, target, decimals)) in self.rows.iter().enumerate() {
            out += &format!("| {scenario} | {name} |");
            for s in &self.stores {
                let cell = match (self.cells.get(&(i, *s)), target) {
                    (None, _) => "–".to_string(),
                    (Some(v), None) => fmt(*v, *decimals),
                    (Some(v), Some(b)) => {
                        let mark = if b.met(*v) { "✓" } else { "✗" };
                        // A miss that would be shown as the target itself (0.495 as 0.50)
                        // gets the decimals that tell them apart.
                        let mut shown = *decimals;
                        while !b.met(*v) && fmt(*v, shown) == fmt(b.value(), shown) && shown < 6 {
                            shown += 1;
                        }
                        format!("{} {mark}", fmt(*v, shown))
                    }
                };
                out += &format!(" {cell} |");
            }
            let target = target.map_or(String::new(), |b| b.show(*decimals));
            out += &format!(" {target} |\n");
        }
        if !self.notes.is_empty() {
            out += "\nNotes:\n";
            for n in &self.notes {
                out += &format!("- {n}\n");
            }
        }
        if self.errors.is_empty() {
            out += "\nCorrectness checks: all passed.\n";
        } else {
            out += "\nCorrectness problems:\n";
            for e in &self.errors {
                out += &format!("- {e}\n");
            }
        }
        out += &format!("\nTotal time: {:.0} s.\n", took.as_secs_f64());
        out
    }
}

fn fmt(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    // Thousands separators for big integers-ish numbers.
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(a, b)| (a, Some(b)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}
