//! CSV and JSON-lines writers of the monitor's records.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use crate::error::ClipError;
use crate::report::ClipReport;

/// Creates `path` and fills it with what `body` writes.
pub(super) fn write(
    path: &Path,
    body: impl FnOnce(&mut String) -> std::fmt::Result,
) -> Result<(), ClipError> {
    let fail = |reason: String| ClipError::Output {
        path: path.display().to_string(),
        reason,
    };
    let mut text = String::new();
    body(&mut text).map_err(|e| fail(e.to_string()))?;
    let mut file = std::fs::File::create(path).map_err(|e| fail(e.to_string()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| fail(e.to_string()))
}

/// One value of a step's record.
enum Field {
    Int(u64),
    Num(f64),
    Opt(Option<f64>),
    Bool(bool),
}

/// The per-step columns shared by the CSV and JSON-lines outputs, in order.
const COLUMNS: [&str; 12] = [
    "step",
    "total_norm",
    "total_norm_after",
    "threshold",
    "coef",
    "clipped",
    "clipped_units",
    "units",
    "skipped",
    "non_finite",
    "nans_zeroed",
    "loss_scale",
];

/// A step's values of [`COLUMNS`].
fn values(r: &ClipReport) -> [Field; 12] {
    [
        Field::Int(r.step),
        Field::Num(r.total_norm),
        Field::Opt(r.total_norm_after),
        Field::Opt(r.threshold.map(f64::from)),
        Field::Opt(r.coef.map(f64::from)),
        // Clipping fired: some unit scaled down, and the step was not skipped.
        Field::Bool(r.clipped_units > 0 && !r.skipped),
        Field::Int(r.clipped_units.into()),
        Field::Int(r.units.into()),
        Field::Bool(r.skipped),
        Field::Bool(r.non_finite),
        Field::Bool(r.nans_zeroed),
        Field::Opt(r.loss_scale.map(|l| f64::from(l.scale))),
    ]
}

impl Field {
    /// As a CSV cell: empty where the value does not apply.
    fn csv(&self) -> String {
        match self {
            Field::Int(v) => v.to_string(),
            Field::Num(v) => v.to_string(),
            Field::Opt(v) => v.map_or(String::new(), |v| v.to_string()),
            Field::Bool(v) => v.to_string(),
        }
    }

    /// As a JSON value: `null` where it does not apply or is not finite.
    fn json(&self) -> String {
        match self {
            Field::Int(v) => v.to_string(),
            Field::Num(v) => num(*v),
            Field::Opt(v) => v.map_or("null".into(), num),
            Field::Bool(v) => v.to_string(),
        }
    }
}

pub(super) fn steps_csv(records: &[ClipReport], out: &mut String) -> std::fmt::Result {
    writeln!(out, "{}", COLUMNS.join(","))?;
    for r in records {
        let cells: Vec<String> = values(r).iter().map(Field::csv).collect();
        writeln!(out, "{}", cells.join(","))?;
    }
    Ok(())
}

pub(super) fn tensors_csv(records: &[ClipReport], out: &mut String) -> std::fmt::Result {
    writeln!(out, "step,tensor,norm,norm_after")?;
    for r in records {
        for t in r.tensors.iter().flatten() {
            writeln!(
                out,
                "{},{},{},{}",
                r.step,
                csv_text(&t.name),
                t.norm,
                t.norm_after
            )?;
        }
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_text(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A JSON number; JSON has no NaN or infinity, so those are `null`.
fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:?}")
    } else {
        "null".into()
    }
}

/// A JSON string literal.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(super) fn jsonl(records: &[ClipReport], out: &mut String) -> std::fmt::Result {
    for r in records {
        let items: Vec<String> = (COLUMNS.iter().zip(values(r)))
            .map(|(name, f)| format!("\"{name}\":{}", f.json()))
            .collect();
        write!(out, "{{{}", items.join(","))?;
        if let Some(tensors) = &r.tensors {
            let items: Vec<String> = (tensors.iter())
                .map(|t| {
                    format!(
                        "{{\"name\":{},\"norm\":{},\"norm_after\":{}}}",
                        string(&t.name),
                        num(t.norm),
                        num(t.norm_after)
                    )
                })
                .collect();
            write!(out, ",\"tensors\":[{}]", items.join(","))?;
        }
        if let Some(groups) = &r.groups {
            let items: Vec<String> = (groups.iter())
                .map(|g| {
                    format!(
                        "{{\"name\":{},\"norm\":{},\"norm_after\":{},\"coef\":{}}}",
                        string(&g.name),
                        num(g.norm),
                        num(g.norm_after),
                        num(g.coef as f64)
                    )
                })
                .collect();
            write!(out, ",\"groups\":[{}]", items.join(","))?;
        }
        writeln!(out, "}}")?;
    }
    Ok(())
}
