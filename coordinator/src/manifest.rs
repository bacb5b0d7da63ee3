//! The cohort manifest: a CSV with `slide_id,path,label` and optional `fold` (the slide's test
//! fold), `split` (`train`/`val`/`test`), `mpp` and `truth` (a lesion mask image or GeoJSON
//! annotation per slide, for the instance-level figures: `wsimil_common::truth`), `patient` (or
//! `case_id`) and `site` (folds stratified by it: `planner::patient_folds`) columns.
//!
//! Validation happens once, up front, and reports every problem at once with its line, so a user
//! fixing a 5,000-slide manifest does not discover errors one run at a time.
//!
//! Paths may be `s3://bucket/key` URLs, and the manifest itself may be one; a relative path
//! resolves against the manifest's folder or `s3://` prefix. Every object is HEADed (32 at a time)
//! and its problems listed with the local ones: missing, empty, access refused, unreachable.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use wsimil_common::ids::SlideId;
use wsimil_common::plan::SurvivalTarget;
use wsimil_common::store::StoreError;
use wsimil_worker::slide::remote::{is_remote, join_url, Buckets};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
    Test,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub slide: SlideId,
    /// Absolute, or relative to the manifest's folder.
    pub path: PathBuf,
    /// Always there in a training manifest; optional in a prediction one ([`Purpose::Prediction`]).
    pub label: Option<String>,
    pub fold: Option<u32>,
    pub split: Option<Split>,
    pub mpp: Option<f64>,
    /// The slide's lesion truth (mask or GeoJSON), resolved like `path`; checked up front when local.
    pub truth: Option<PathBuf>,
    /// The patient the slide is from (`patient` column, or CLAM's `case_id`): a patient's slides
    /// always go to the same fold, so no patient is both trained and tested on.
    pub patient: Option<String>,
    /// The site the slide comes from (`site` column: the lab or scanner; TCGA's tissue source site,
    /// the barcode's second field): the folds are stratified by it as well as by label
    /// (`planner::patient_folds`). A patient's slides share it.
    pub site: Option<String>,
    /// Its follow-up (survival manifests: [`SurvivalColumns`]).
    pub survival: Option<SurvivalTarget>,
}

/// Where a manifest gives each slide's follow-up, in the order looked for: `time` and `event`
/// (1: the event was observed, 0: censored at `time`); TCGA's clinical columns `vital_status`
/// (`Dead`/`Alive`), `days_to_death` and `days_to_last_follow_up` (GDC's `'--` for none); or
/// MCAT's `survival_months` and `censorship` (1: censored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SurvivalColumns {
    TimeEvent { time: usize, event: usize },
    Tcga { vital: usize, death: usize, follow_up: usize },
    Mcat { months: usize, censorship: usize },
}

impl SurvivalColumns {
    fn find(col: &dyn Fn(&str) -> Option<usize>) -> Option<SurvivalColumns> {
        if let (Some(time), Some(event)) = (col("time"), col("event")) {
            return Some(SurvivalColumns::TimeEvent { time, event });
        }
        if let (Some(vital), Some(death), Some(follow_up)) =
            (col("vital_status"), col("days_to_death"), col("days_to_last_follow_up"))
        {
            return Some(SurvivalColumns::Tcga { vital, death, follow_up });
        }
        if let (Some(months), Some(censorship)) = (col("survival_months"), col("censorship")) {
            return Some(SurvivalColumns::Mcat { months, censorship });
        }
        None
    }

    /// A row's follow-up: `Ok(None)` when its cells are all empty, else the target or what is
    /// wrong with it.
    fn read(&self, field: &dyn Fn(usize) -> Option<String>) -> Result<Option<SurvivalTarget>, String> {
        // GDC's clinical tables write a missing value as `'--`.
        let get = |c: usize| field(c).filter(|v| !matches!(v.as_str(), "'--" | "--" | "NA" | "NaN" | "nan"));
        let time = |name: &str, c: usize| -> Result<f64, String> {
            let v = get(c).ok_or_else(|| format!("no {name}"))?;
            match v.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
                _ => Err(format!("{name} {v:?} is not a non-negative number")),
            }
        };
        let flag = |name: &str, c: usize| -> Result<bool, String> {
            let v = get(c).ok_or_else(|| format!("no {name}"))?;
            match v.as_str() {
                "1" | "1.0" => Ok(true),
                "0" | "0.0" => Ok(false),
                _ => Err(format!("{name} {v:?} is not 0 or 1")),
            }
        };
        let cells: Vec<usize> = match *self {
            SurvivalColumns::TimeEvent { time, event } => vec![time, event],
            SurvivalColumns::Tcga { vital, death, follow_up } => vec![vital, death, follow_up],
            SurvivalColumns::Mcat { months, censorship } => vec![months, censorship],
        };
        if cells.iter().all(|&c| get(c).is_none()) {
            return Ok(None);
        }
        Ok(Some(match *self {
            SurvivalColumns::TimeEvent { time: t, event } => {
                SurvivalTarget { time: time("time", t)?, event: flag("event", event)? }
            }
            SurvivalColumns::Mcat { months, censorship } => {
                SurvivalTarget { time: time("survival_months", months)?, event: !flag("censorship", censorship)? }
            }
            SurvivalColumns::Tcga { vital, death, follow_up } => {
                let v = get(vital).ok_or("no vital_status")?;
                match v.to_ascii_lowercase().as_str() {
                    "dead" => SurvivalTarget { time: time("days_to_death", death)?, event: true },
                    "alive" => SurvivalTarget { time: time("days_to_last_follow_up", follow_up)?, event: false },
                    _ => return Err(format!("vital_status {v:?} is not Dead or Alive")),
                }
            }
        }))
    }
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub source: PathBuf,
    pub rows: Vec<Row>,
    /// Class names; a label's index here is its class.
    pub classes: Vec<String>,
}

/// One problem, at a line of the file (1-based, header = line 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read manifest: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{}", render(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut s = format!(
        "{}: {} problem{} in the manifest:",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        match p.line {
            Some(l) => s.push_str(&format!("\n  line {l}: {}", p.message)),
            None => s.push_str(&format!("\n  {}", p.message)),
        }
    }
    s
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What a cohort is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Training: every slide has a label, and there are two classes at least.
    Training,
    /// A trained model applied to it: labels optional (when given, they must be the model's classes),
    /// follow-up too (when given, checked as a survival manifest's).
    Prediction,
    /// Training a survival model: every slide has its follow-up ([`SurvivalColumns`]) and the cohort
    /// has events; labels are not read (a slide's class is whether its event was observed, which
    /// the folds are stratified by).
    Survival,
}

/// Read and validate a training manifest. `classes`, when given, fixes the class order and makes any
/// other label an error; otherwise classes are the sorted distinct labels.
pub async fn load(path: &Path, classes: Option<&[String]>, buckets: &Buckets) -> Result<Manifest, ManifestError> {
    load_for(path, classes, Purpose::Training, buckets).await
}

/// Read and validate a manifest for `purpose` (every problem at once, the objects of `s3://`
/// paths HEADed through `buckets`).
pub async fn load_for(
    path: &Path,
    classes: Option<&[String]>,
    purpose: Purpose,
    buckets: &Buckets,
) -> Result<Manifest, ManifestError> {
    let unreadable = |reason: String| ManifestError::Unreadable { path: path.to_path_buf(), reason };
    let location = path.to_string_lossy();
    let (text, base) = if is_remote(&location) {
        let bytes = buckets.get(&location).await.map_err(|e| unreadable(e.to_string()))?;
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| unreadable("not UTF-8 text".into()))?;
        let base = location.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or_default();
        (text, PathBuf::from(base))
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
        (text, path.parent().map(Path::to_path_buf).unwrap_or_default())
    };
    let invalid = |problems| ManifestError::Invalid { path: path.to_path_buf(), problems };
    let parsed = parse_for(&text, &base, classes, purpose);
    let mut remote = check_objects(&parsed.remote, buckets).await;
    remote.extend(check_truth(&parsed.remote_truth, buckets).await);
    let mut problems = parsed.problems;
    if !remote.is_empty() {
        problems.extend(remote);
        problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    }
    if problems.is_empty() {
        Ok(Manifest { source: path.to_path_buf(), rows: parsed.rows, classes: parsed.classes })
    } else {
        Err(invalid(problems))
    }
}

/// Parse a training manifest's text; relative paths resolve against `base`. Returns all problems
/// on failure (`s3://` objects are not looked at here: see [`load`]).
pub fn parse(text: &str, base: &Path, classes: Option<&[String]>) -> Result<(Vec<Row>, Vec<String>), Vec<Problem>> {
    let p = parse_for(text, base, classes, Purpose::Training);
    if p.problems.is_empty() {
        Ok((p.rows, p.classes))
    } else {
        Err(p.problems)
    }
}

/// A manifest's text, parsed: what it lists, what is wrong with it, and the objects in buckets
/// still to be looked at.
struct Parsed {
    rows: Vec<Row>,
    classes: Vec<String>,
    problems: Vec<Problem>,
    /// (line, slide id, URL) of every `s3://` path.
    remote: Vec<(usize, String, String)>,
    /// (line, slide id, URL) of every `s3://` truth file.
    remote_truth: Vec<(usize, String, String)>,
}

/// HEAD every object: a problem for each that is missing, empty or cannot be reached.
async fn check_objects(remote: &[(usize, String, String)], buckets: &Buckets) -> Vec<Problem> {
    let urls: Vec<String> = remote.iter().map(|(_, _, u)| u.clone()).collect();
    let sizes = buckets.head_all(&urls).await;
    let mut problems = Vec::new();
    for ((line, id, url), size) in remote.iter().zip(sizes) {
        let message = match size {
            Ok(0) => format!("{id}: {url} is empty"),
            Ok(_) => continue,
            Err(StoreError::NotFound { .. }) => format!("{id}: slide object not found: {url}"),
            Err(StoreError::Auth { reason, .. }) => format!("{id}: access to {url} refused: {reason}"),
            Err(e) => format!("{id}: cannot read {url}: {e}"),
        };
        problems.push(Problem { line: Some(*line), message });
    }
    problems
}

/// Read every truth file in a bucket and check it as local ones are: a problem for each that
/// cannot be read or is not a mask or an annotation.
async fn check_truth(remote: &[(usize, String, String)], buckets: &Buckets) -> Vec<Problem> {
    use futures::StreamExt;
    let got: Vec<_> =
        futures::stream::iter(remote.iter().map(|(_, _, url)| buckets.get(url))).buffered(16).collect().await;
    let mut problems = Vec::new();
    for ((line, id, url), bytes) in remote.iter().zip(got) {
        let message = match bytes {
            Ok(b) => match wsimil_common::truth::Truth::validate(url, &b) {
                Ok(()) => continue,
                Err(e) => format!("{id}: truth {e}"),
            },
            Err(e) => format!("{id}: cannot read its truth {url}: {e}"),
        };
        problems.push(Problem { line: Some(*line), message });
    }
    problems
}

fn parse_for(text: &str, base: &Path, classes: Option<&[String]>, purpose: Purpose) -> Parsed {
    let labels_required = purpose == Purpose::Training;
    let survival_required = purpose == Purpose::Survival;
    let mut problems: Vec<Problem> = Vec::new();
    let mut remote = Vec::new();
    let mut remote_truth = Vec::new();
    let mut at = |line: Option<usize>, message: String| problems.push(Problem { line, message });
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(true).from_reader(text.as_bytes());
    let headers: Vec<String> = match reader.headers() {
        Ok(h) => h.iter().map(|s| s.to_ascii_lowercase()).collect(),
        Err(e) => {
            let problems = vec![Problem { line: Some(1), message: format!("unreadable header: {e}") }];
            return Parsed { rows: Vec::new(), classes: Vec::new(), problems, remote, remote_truth };
        }
    };
    let col = |name: &str| headers.iter().position(|h| h == name);
    let (id_c, path_c, label_c) = (col("slide_id"), col("path"), col("label"));
    let survival_c = SurvivalColumns::find(&col);
    if survival_required && survival_c.is_none() {
        at(
            Some(1),
            "no follow-up columns: a survival manifest gives time,event (1: event, 0: censored), or TCGA's \
             vital_status,days_to_death,days_to_last_follow_up, or MCAT's survival_months,censorship"
                .into(),
        );
    }
    // A survival manifest's classes are whether the event was observed: its labels are not read.
    let label_c = if survival_required { None } else { label_c };
    for (name, c) in [("slide_id", id_c), ("path", path_c), ("label", label_c)] {
        if c.is_none() && (name != "label" || labels_required) {
            at(Some(1), format!("missing required column {name:?} (columns: slide_id,path,label[,fold|split][,mpp])"));
        }
    }
    let (Some(id_c), Some(path_c)) = (id_c, path_c) else {
        return Parsed { rows: Vec::new(), classes: Vec::new(), problems, remote, remote_truth };
    };
    if label_c.is_none() && labels_required {
        return Parsed { rows: Vec::new(), classes: Vec::new(), problems, remote, remote_truth };
    }
    let (fold_c, split_c, mpp_c) = (col("fold"), col("split"), col("mpp"));
    // Truth feeds a run's instance-level figures; an application of a model reads no such column.
    let truth_c = if purpose != Purpose::Prediction { col("truth") } else { None };
    let patient_c = col("patient").or_else(|| col("case_id"));
    let site_c = col("site");
    // Each patient's first slide: (line, id, label, fold, split, follow-up, site).
    type First = (usize, String, Option<String>, Option<u32>, Option<Split>, Option<SurvivalTarget>, Option<String>);
    let mut patients: HashMap<String, First> = HashMap::new();
    let known: Option<BTreeSet<&str>> = classes.map(|c| c.iter().map(String::as_str).collect());
    let mut rows = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    // Rows read, and of them how many give a fold / a split (valid or not).
    let (mut n_rows, mut fold_given, mut split_given) = (0usize, 0usize, 0usize);
    for (i, rec) in reader.records().enumerate() {
        let line = i + 2;
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                at(Some(line), format!("unreadable row: {e}"));
                continue;
            }
        };
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let field = |c: Option<usize>| c.and_then(|c| rec.get(c)).map(str::trim).filter(|s| !s.is_empty());
        n_rows += 1;
        fold_given += field(fold_c).is_some() as usize;
        split_given += field(split_c).is_some() as usize;
        let raw_id = field(Some(id_c)).unwrap_or("");
        let slide = match SlideId::new(raw_id) {
            Ok(s) => Some(s),
            Err(e) => {
                at(Some(line), format!("slide_id {raw_id:?}: {e}"));
                None
            }
        };
        if let Some(first) = seen.get(raw_id) {
            at(Some(line), format!("duplicate slide_id {raw_id:?} (first on line {first})"));
        } else if !raw_id.is_empty() {
            seen.insert(raw_id.to_string(), line);
        }
        let path = match field(Some(path_c)) {
            None => {
                at(Some(line), format!("{raw_id}: empty path"));
                None
            }
            Some(p) if is_remote(p) || (is_remote(&base.to_string_lossy()) && !p.starts_with('/')) => {
                let url = if is_remote(p) { p.to_string() } else { join_url(&base.to_string_lossy(), p) };
                remote.push((line, raw_id.to_string(), url.clone()));
                Some(PathBuf::from(url))
            }
            Some(p) => {
                let p = PathBuf::from(p);
                let full = if p.is_absolute() { p } else { base.join(p) };
                match std::fs::metadata(&full) {
                    Ok(m) if m.is_dir() => {
                        at(Some(line), format!("{raw_id}: {} is a directory, not a slide file", full.display()))
                    }
                    Ok(m) if m.len() == 0 => at(Some(line), format!("{raw_id}: {} is empty", full.display())),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        at(Some(line), format!("{raw_id}: slide file not found: {}", full.display()))
                    }
                    Err(e) => at(Some(line), format!("{raw_id}: cannot read {}: {e}", full.display())),
                }
                Some(full)
            }
        };
        let label = match field(label_c) {
            None if !labels_required => Some(None),
            None => {
                at(Some(line), format!("{raw_id}: empty label"));
                None
            }
            Some(l) => {
                if let Some(k) = &known {
                    if !k.contains(l) {
                        at(
                            Some(line),
                            format!(
                                "{raw_id}: unknown label {l:?} (classes: {})",
                                k.iter().copied().collect::<Vec<_>>().join(", ")
                            ),
                        );
                    }
                }
                Some(Some(l.to_string()))
            }
        };
        let fold = match field(fold_c) {
            None => None,
            Some(f) => match f.parse::<u32>() {
                Ok(v) => Some(v),
                Err(_) => {
                    at(Some(line), format!("{raw_id}: fold {f:?} is not a non-negative integer"));
                    None
                }
            },
        };
        let split = match field(split_c) {
            None => None,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "train" => Some(Split::Train),
                "val" | "valid" | "validation" => Some(Split::Val),
                "test" => Some(Split::Test),
                _ => {
                    at(Some(line), format!("{raw_id}: split {s:?} is not train, val or test"));
                    None
                }
            },
        };
        let mpp = match field(mpp_c) {
            None => None,
            Some(m) => match m.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Some(v),
                _ => {
                    at(Some(line), format!("{raw_id}: mpp {m:?} is not a positive number"));
                    None
                }
            },
        };
        let truth = match field(truth_c) {
            None => None,
            Some(t) if is_remote(t) || (is_remote(&base.to_string_lossy()) && !t.starts_with('/')) => {
                // Read through the store's S3 settings: checked by `load_for`, before any work.
                let url = if is_remote(t) { t.to_string() } else { join_url(&base.to_string_lossy(), t) };
                remote_truth.push((line, raw_id.to_string(), url.clone()));
                Some(PathBuf::from(url))
            }
            Some(t) => {
                let p = PathBuf::from(t);
                let full = if p.is_absolute() { p } else { base.join(p) };
                match std::fs::read(&full) {
                    Ok(bytes) => {
                        if let Err(e) = wsimil_common::truth::Truth::validate(&full.display().to_string(), &bytes) {
                            at(Some(line), format!("{raw_id}: truth {e}"));
                        }
                    }
                    Err(e) => at(Some(line), format!("{raw_id}: cannot read its truth {}: {e}", full.display())),
                }
                Some(full)
            }
        };
        let survival = match survival_c.map(|c| c.read(&|k| field(Some(k)).map(str::to_string))) {
            None => None,
            Some(Ok(Some(t))) => Some(t),
            Some(Ok(None)) => {
                if survival_required {
                    at(Some(line), format!("{raw_id}: no follow-up (time and event are empty)"));
                }
                None
            }
            Some(Err(e)) => {
                at(Some(line), format!("{raw_id}: {e}"));
                None
            }
        };
        let label = match (survival_required, survival) {
            (true, Some(t)) => Some(Some(if t.event { "event" } else { "censored" }.to_string())),
            (true, None) => None,
            (false, _) => label,
        };
        let patient = field(patient_c).map(str::to_string);
        let site = field(site_c).map(str::to_string);
        if let (Some(p), Some(label)) = (&patient, &label) {
            match patients.get(p) {
                None => {
                    let first = (line, raw_id.to_string(), label.clone(), fold, split, survival, site.clone());
                    patients.insert(p.clone(), first);
                }
                Some((first_line, first_id, first_label, first_fold, first_split, first_survival, first_site)) => {
                    fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
                        v.as_ref().map_or("none".into(), |v| format!("{v:?}").to_lowercase())
                    }
                    let differs = |what: &str, a: String, b: String| {
                        format!(
                            "patient {p:?}: {raw_id} has {what} {a}, its slide {first_id} (line {first_line}) {b}: a patient's slides share their {what}"
                        )
                    };
                    if labels_required && label != first_label {
                        at(Some(line), differs("label", show(label), show(first_label)));
                    }
                    if survival != *first_survival {
                        let f = |s: &Option<SurvivalTarget>| {
                            s.map_or("none".into(), |s| format!("time {} event {}", s.time, s.event as u8))
                        };
                        at(Some(line), differs("follow-up", f(&survival), f(first_survival)));
                    }
                    if fold != *first_fold {
                        at(Some(line), differs("fold", show(&fold), show(first_fold)));
                    }
                    if split != *first_split {
                        at(Some(line), differs("split", show(&split), show(first_split)));
                    }
                    if site != *first_site {
                        let f = |s: &Option<String>| s.as_ref().map_or("none".into(), |s| format!("{s:?}"));
                        at(Some(line), differs("site", f(&site), f(first_site)));
                    }
                }
            }
        }
        if let (Some(slide), Some(path), Some(label)) = (slide, path, label) {
            rows.push(Row { slide, path, label, fold, split, mpp, truth, patient, site, survival });
        }
    }
    let row_problems = problems.len();
    if rows.is_empty() && row_problems == 0 {
        problems.push(Problem { line: None, message: "the cohort is empty: no slides listed".into() });
    }
    for (what, given) in [("fold", fold_given), ("split", split_given)] {
        if given > 0 && given < n_rows {
            let message = format!("{what} is given for {given} of {n_rows} slides: give it for all or none");
            problems.push(Problem { line: None, message });
        }
    }
    let classes: Vec<String> = match classes {
        _ if survival_required => vec!["censored".into(), "event".into()],
        Some(c) => c.to_vec(),
        None => rows.iter().filter_map(|r| r.label.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
    };
    if survival_required
        && row_problems == 0
        && !rows.is_empty()
        && rows.iter().all(|r| r.survival.is_some_and(|s| !s.event))
    {
        let message =
            format!("no events in the cohort: all {} slides are censored, so no risk can be learned", rows.len());
        problems.push(Problem { line: None, message });
    }
    if labels_required && !rows.is_empty() && classes.len() < 2 {
        problems.push(Problem {
            line: None,
            message: format!("only one class ({}) in the cohort: a classifier needs at least two", classes.join(", ")),
        });
    }
    Parsed { rows, classes, problems, remote, remote_truth }
}

impl Manifest {
    /// The class index of a row of a training manifest (validated: it has a label of a class).
    pub fn label_index(&self, row: &Row) -> usize {
        self.class_index(row.label.as_deref().expect("training manifests have a label on every row"))
    }

    pub fn class_index(&self, label: &str) -> usize {
        self.classes.iter().position(|c| c == label).expect("labels validated against classes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in files {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        d
    }

    #[test]
    fn a_good_manifest_parses_with_relative_paths_and_sorted_classes() {
        let d = dir_with(&["a.svs", "b.svs"]);
        let (rows, classes) =
            parse("slide_id,path,label,mpp\na,a.svs,tumor,0.25\nb, b.svs ,normal,\n", d.path(), None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].path, d.path().join("a.svs"));
        assert_eq!(rows[0].mpp, Some(0.25));
        assert_eq!(rows[1].mpp, None);
        assert_eq!(classes, vec!["normal", "tumor"]);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let d = dir_with(&["a.svs", "b.svs"]);
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let text = "slide_id,path,label,fold,mpp\n\
                    a,a.svs,tumor,0,\n\
                    a,b.svs,normal,1,\n\
                    ../evil,b.svs,normal,1,\n\
                    c,missing.svs,normal,x,\n\
                    d,b.svs,,1,-3\n\
                    e,b.svs,cancer,2,\n\
                    f,sub,normal,2,\n";
        let classes = vec!["normal".to_string(), "tumor".to_string()];
        let problems = parse(text, d.path(), Some(&classes)).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("line 3: duplicate slide_id \"a\" (first on line 2)"), "{text:#?}");
        assert!(has("line 4: slide_id \"../evil\""), "{text:#?}");
        assert!(has("line 5: c: slide file not found"), "{text:#?}");
        assert!(has("line 5: c: fold \"x\""), "{text:#?}");
        assert!(has("line 6: d: empty label"), "{text:#?}");
        assert!(has("line 6: d: mpp \"-3\""), "{text:#?}");
        assert!(has("line 7: e: unknown label \"cancer\""), "{text:#?}");
        assert!(has("line 8: f: ") && has("sub is a directory, not a slide file"), "{text:#?}");
        assert_eq!(problems.len(), 8, "{text:#?}");
    }

    #[test]
    fn a_patients_slides_must_agree_on_label_fold_and_site() {
        let d = dir_with(&["a.svs", "b.svs", "c.svs"]);
        let ok = "slide_id,path,label,case_id,site\na,a.svs,tumor,P1,A7\nb,b.svs,tumor,P1,A7\nc,c.svs,normal,P2,\n";
        let (rows, _) = parse(ok, d.path(), None).unwrap();
        assert_eq!(rows.iter().map(|r| r.patient.as_deref()).collect::<Vec<_>>(), [Some("P1"), Some("P1"), Some("P2")]);
        assert_eq!(rows.iter().map(|r| r.site.as_deref()).collect::<Vec<_>>(), [Some("A7"), Some("A7"), None]);
        let bad = "slide_id,path,label,fold,patient,site\na,a.svs,tumor,0,P1,A7\nb,b.svs,normal,1,P1,BH\nc,c.svs,normal,1,P2,A7\n";
        let problems = parse(bad, d.path(), None).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("line 3: patient \"P1\": b has label \"normal\", its slide a (line 2) \"tumor\""), "{text:#?}");
        assert!(has("line 3: patient \"P1\": b has fold 1, its slide a (line 2) 0"), "{text:#?}");
        assert!(has("line 3: patient \"P1\": b has site \"BH\", its slide a (line 2) \"A7\""), "{text:#?}");
        assert_eq!(problems.len(), 3, "{text:#?}");
    }

    #[test]
    fn a_truth_column_is_resolved_like_paths_and_checked_before_any_work() {
        let d = dir_with(&["a.svs", "b.svs", "c.svs", "d.svs"]);
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(image::GrayImage::new(4, 4))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(d.path().join("a.mask.png"), png).unwrap();
        std::fs::write(
            d.path().join("b.geojson"),
            r#"{"type": "Polygon", "coordinates": [[[0,0],[9,0],[0,9],[0,0]]]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("c.geojson"),
            r#"{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}"#,
        )
        .unwrap();
        let text = "slide_id,path,label,truth\na,a.svs,tumor,a.mask.png\nb,b.svs,tumor,b.geojson\n\
                    c,c.svs,tumor,c.geojson\nd,d.svs,normal,\ne,a.svs,normal,gone.png\n";
        let problems = parse(text, d.path(), None).unwrap_err();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 2, "{text:#?}");
        assert!(
            text[0].contains("line 4: c: truth") && text[0].contains("none a Polygon or MultiPolygon"),
            "{text:#?}"
        );
        assert!(text[1].contains("line 6: e: cannot read its truth") && text[1].contains("gone.png"), "{text:#?}");
        let ok = "slide_id,path,label,truth\na,a.svs,tumor,a.mask.png\nb,b.svs,tumor,b.geojson\nd,d.svs,normal,\n";
        let (rows, _) = parse(ok, d.path(), None).unwrap();
        assert_eq!(rows[0].truth, Some(d.path().join("a.mask.png")));
        assert_eq!(rows[2].truth, None, "an empty cell: no truth for that slide");
    }

    #[test]
    fn s3_paths_are_taken_as_urls_and_relative_ones_join_an_s3_manifest_prefix() {
        let d = dir_with(&["a.svs"]);
        let text = "slide_id,path,label\na,a.svs,x\nb,s3://slides/tcga/b.svs,y\n";
        let p = parse_for(text, d.path(), None, Purpose::Training);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.rows[1].path, PathBuf::from("s3://slides/tcga/b.svs"));
        assert_eq!(p.remote, vec![(3, "b".to_string(), "s3://slides/tcga/b.svs".to_string())]);
        // The manifest itself in a bucket: relative paths are keys beside it, nothing is stat'ed.
        let p = parse_for(text, Path::new("s3://cohorts/luad"), None, Purpose::Training);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.rows[0].path, PathBuf::from("s3://cohorts/luad/a.svs"));
        assert_eq!(p.remote.len(), 2);
    }

    #[test]
    fn empty_cohort_missing_columns_one_class_and_partial_folds_are_errors() {
        let d = dir_with(&["a.svs", "b.svs"]);
        let p = parse("slide_id,path,label\n", d.path(), None).unwrap_err();
        assert!(p[0].message.contains("empty"), "{p:?}");
        let p = parse("id,file\n", d.path(), None).unwrap_err();
        assert!(
            p.iter().any(|x| x.message.contains("\"slide_id\"")) && p.iter().any(|x| x.message.contains("\"label\""))
        );
        let p = parse("slide_id,path,label\na,a.svs,x\nb,b.svs,x\n", d.path(), None).unwrap_err();
        assert!(p[0].message.contains("only one class"), "{p:?}");
        let p = parse("slide_id,path,label,fold\na,a.svs,x,0\nb,b.svs,y,\n", d.path(), None).unwrap_err();
        assert!(p[0].message.contains("fold is given for 1 of 2"), "{p:?}");
    }

    #[test]
    fn follow_up_is_read_from_time_event_tcga_or_mcat_columns() {
        let d = dir_with(&["a.svs", "b.svs"]);
        let read = |text: &str| {
            let p = parse_for(text, d.path(), None, Purpose::Survival);
            assert!(p.problems.is_empty(), "{:?}", p.problems);
            (p.rows.iter().map(|r| r.survival.unwrap()).collect::<Vec<_>>(), p.classes)
        };
        let want = vec![SurvivalTarget { time: 410.0, event: true }, SurvivalTarget { time: 1210.5, event: false }];
        let (got, classes) = read("slide_id,path,time,event\na,a.svs,410,1\nb,b.svs,1210.5,0\n");
        assert_eq!((got, classes), (want.clone(), vec!["censored".to_string(), "event".to_string()]));
        let tcga = "slide_id,path,vital_status,days_to_death,days_to_last_follow_up\n\
                    a,a.svs,Dead,410,'--\nb,b.svs,Alive,'--,1210.5\n";
        assert_eq!(read(tcga).0, want);
        let mcat = "slide_id,path,survival_months,censorship\na,a.svs,410,0\nb,b.svs,1210.5,1\n";
        assert_eq!(read(mcat).0, want);
        // A label column is not what a survival run learns: its class is whether the event was seen.
        let p = parse_for(
            "slide_id,path,label,time,event\na,a.svs,LUAD,410,1\nb,b.svs,LUSC,9,0\n",
            d.path(),
            None,
            Purpose::Survival,
        );
        let labels: Vec<_> = p.rows.iter().map(|r| r.label.clone().unwrap()).collect();
        assert_eq!(labels, ["event", "censored"]);
    }

    #[test]
    fn bad_follow_up_is_refused_before_any_work_naming_every_row() {
        let d = dir_with(&["a.svs"]);
        let text = "slide_id,path,time,event,patient\n\
                    a,a.svs,-3,1,\n\
                    b,a.svs,12,2,\n\
                    c,a.svs,,,\n\
                    d,a.svs,ten,0,\n\
                    e,a.svs,5,1,P\n\
                    f,a.svs,7,1,P\n";
        let problems = parse_for(text, d.path(), None, Purpose::Survival).problems;
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("line 2: a: time \"-3\" is not a non-negative number"), "{text:#?}");
        assert!(has("line 3: b: event \"2\" is not 0 or 1"), "{text:#?}");
        assert!(has("line 4: c: no follow-up"), "{text:#?}");
        assert!(has("line 5: d: time \"ten\""), "{text:#?}");
        assert!(
            has("line 7: patient \"P\": f has follow-up time 7 event 1, its slide e (line 6) time 5 event 1"),
            "{text:#?}"
        );
        assert_eq!(problems.len(), 5, "{text:#?}");
        let tcga =
            "slide_id,path,vital_status,days_to_death,days_to_last_follow_up\na,a.svs,Dead,'--,300\nb,a.svs,Lost,1,2\n";
        let text: Vec<String> =
            parse_for(tcga, d.path(), None, Purpose::Survival).problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text, ["line 2: a: no days_to_death", "line 3: b: vital_status \"Lost\" is not Dead or Alive"]);
        let p = parse_for("slide_id,path,label\na,a.svs,x\n", d.path(), None, Purpose::Survival).problems;
        assert!(p[0].message.starts_with("no follow-up columns"), "{p:?}");
        let p = parse_for("slide_id,path,time,event\na,a.svs,3,0\nb,a.svs,4,0\n", d.path(), None, Purpose::Survival)
            .problems;
        assert_eq!(p.len(), 1);
        assert!(p[0].message.starts_with("no events in the cohort: all 2 slides are censored"), "{p:?}");
    }

    #[tokio::test]
    async fn load_names_the_file() {
        let buckets = Buckets::new(Default::default());
        let err = load(Path::new("/no/such/manifest.csv"), None, &buckets).await.unwrap_err();
        assert!(err.to_string().contains("/no/such/manifest.csv"), "{err}");
        let d = dir_with(&[]);
        let m = d.path().join("m.csv");
        std::fs::write(&m, "slide_id,path,label\n").unwrap();
        let err = load(&m, None, &buckets).await.unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: 1 problem in the manifest:", m.display())), "{err}");
    }
}
