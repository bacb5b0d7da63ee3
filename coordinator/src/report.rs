//! `runs/<run>/report.html`: one page a person opens after a run, self-contained (no network: the
//! plots are inline SVG drawn here, the one script is inline, the heatmaps are the run's own PNGs
//! beside it, linked relatively, so the folder can be copied or synced from a bucket as it is).
//!
//! What it shows, from what the store holds (so `wsimil report RUN` re-makes it at any time): the
//! cohort and the run's settings; every round's figures side by side (ICMIL rounds against round
//! 0); for each round ROC and precision-recall curves per fold and pooled, the confusion matrix,
//! calibration, the training curves, the instance-level figures where slides have truth; the
//! slides ranked worst error first with their attention heatmaps over the thumbnails; and every
//! failed job with its reason.
//!
//! The curves are computed here from the out-of-fold predictions (`roc_points`, `pr_points`,
//! `calibration`); the area under the ROC points equals `metrics::binary_auc` (a test says so).

use crate::predictions::Prediction;
use crate::run::RoundMetrics;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use wsimil_common::ids::RunId;
use wsimil_common::job::FailureRecord;
use wsimil_common::layout;
use wsimil_common::plan::RunPlan;
use wsimil_common::records::FoldReport;
use wsimil_common::store::Store;

/// The ROC curve of `scores` against `positive`: (false positive rate, true positive rate) from
/// (0, 0) to (1, 1), one point per distinct score (ties move diagonally, as the Mann-Whitney AUC
/// counts them half). Empty when a class is absent.
pub fn roc_points(scores: &[f64], positive: &[bool]) -> Vec<(f64, f64)> {
    let p = positive.iter().filter(|&&b| b).count() as f64;
    let n = positive.len() as f64 - p;
    if p == 0.0 || n == 0.0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut pts = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if positive[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        pts.push((fp / n, tp / p));
    }
    pts
}

/// Area under a curve given as points in order of x (trapezoids).
pub fn area(points: &[(f64, f64)]) -> f64 {
    points.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum()
}

/// The precision-recall curve: (recall, precision) at each distinct score, highest first, starting
/// at recall 0 with the first threshold's precision. Empty without positives.
pub fn pr_points(scores: &[f64], positive: &[bool]) -> Vec<(f64, f64)> {
    let p = positive.iter().filter(|&&b| b).count() as f64;
    if p == 0.0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut seen) = (0.0, 0.0);
    let mut pts = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            tp += positive[idx[i]] as u8 as f64;
            seen += 1.0;
            i += 1;
        }
        if pts.is_empty() {
            pts.push((0.0, tp / seen));
        }
        pts.push((tp / p, tp / seen));
    }
    pts
}

/// Reliability of probabilities: `bins` equal-width bins of the predicted probability, each with
/// (mean predicted, fraction observed positive, count); empty bins left out.
pub fn calibration(probs: &[f64], positive: &[bool], bins: usize) -> Vec<(f64, f64, usize)> {
    let mut acc = vec![(0.0, 0.0, 0usize); bins];
    for (&p, &y) in probs.iter().zip(positive) {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        acc[b].0 += p;
        acc[b].1 += y as u8 as f64;
        acc[b].2 += 1;
    }
    acc.into_iter().filter(|b| b.2 > 0).map(|(s, y, c)| (s / c as f64, y / c as f64, c)).collect()
}

/// Counts of (true class, predicted class).
pub fn confusion(rows: &[Prediction], n_classes: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; n_classes]; n_classes];
    for r in rows {
        if let Some(l) = r.label {
            m[l][r.predicted()] += 1;
        }
    }
    m
}

/// HTML-escaped text.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub(crate) const COLOURS: [&str; 8] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn thicker (the pooled curve among the folds').
    pub bold: bool,
    /// Points drawn as dots too (calibration bins).
    pub dots: bool,
}

/// A line chart as inline SVG: axes with ticks over `x` and `y` ranges, a dashed reference line
/// from (x0, y0) to (x1, y1) if given, one line per series and a legend.
pub fn line_chart(
    title: &str,
    axes: (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
    reference: Option<((f64, f64), (f64, f64))>,
    series: &[Series],
) -> String {
    let (w, h, l, r, t, b) = (360.0, 300.0, 48.0, 12.0, 26.0, 40.0);
    let sx = |v: f64| l + (v - x.0) / (x.1 - x.0).max(1e-12) * (w - l - r);
    let sy = |v: f64| h - b - (v - y.0) / (y.1 - y.0).max(1e-12) * (h - t - b);
    let mut s = format!(
        r#"<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {w} {full}" width="{w}" height="{full}" xmlns="http://www.w3.org/2000/svg"><title>{title}</title><text x="{cx}" y="16" text-anchor="middle" class="ct">{title}</text>"#,
        title = esc(title),
        cx = w / 2.0,
        // The legend goes under the plot, two entries a row, where it hides no curve.
        full = h + 14.0 * series.len().div_ceil(2) as f64 + 4.0,
    );
    for i in 0..=5 {
        let (vx, vy) = (x.0 + (x.1 - x.0) * i as f64 / 5.0, y.0 + (y.1 - y.0) * i as f64 / 5.0);
        let _ = write!(
            s,
            r##"<line x1="{gx}" y1="{top}" x2="{gx}" y2="{bot}" class="grid"/><text x="{gx}" y="{ty}" text-anchor="middle" class="tick">{lx}</text><line x1="{l}" y1="{gy}" x2="{right}" y2="{gy}" class="grid"/><text x="{tx}" y="{gy2}" text-anchor="end" class="tick">{ly}</text>"##,
            gx = sx(vx),
            top = t,
            bot = h - b,
            ty = h - b + 14.0,
            lx = tick(vx),
            gy = sy(vy),
            right = w - r,
            tx = l - 4.0,
            gy2 = sy(vy) + 4.0,
            ly = tick(vy),
        );
    }
    let _ = write!(
        s,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" class="frame"/><text x="{cx}" y="{xl}" text-anchor="middle" class="axis">{ax}</text><text transform="translate(12 {cy}) rotate(-90)" text-anchor="middle" class="axis">{ay}</text>"#,
        pw = w - l - r,
        ph = h - t - b,
        cx = l + (w - l - r) / 2.0,
        xl = h - 6.0,
        cy = t + (h - t - b) / 2.0,
        ax = esc(axes.0),
        ay = esc(axes.1)
    );
    if let Some(((x0, y0), (x1, y1))) = reference {
        let _ = write!(s, r#"<line x1="{}" y1="{}" x2="{}" y2="{}" class="ref"/>"#, sx(x0), sy(y0), sx(x1), sy(y1));
    }
    for (i, se) in series.iter().enumerate() {
        let colour = if se.bold { "#111" } else { COLOURS[i % COLOURS.len()] };
        let path: Vec<String> = se.points.iter().map(|&(a, b)| format!("{:.1},{:.1}", sx(a), sy(b))).collect();
        let _ = write!(
            s,
            r#"<polyline class="series" data-name="{}" fill="none" stroke="{colour}" stroke-width="{}" points="{}"/>"#,
            esc(&se.name),
            if se.bold { 2.6 } else { 1.4 },
            path.join(" ")
        );
        if se.dots {
            for &(a, b) in &se.points {
                let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#, sx(a), sy(b));
            }
        }
        let (lx, ly) = (l + (i % 2) as f64 * (w - l - r) / 2.0, h + 12.0 + 14.0 * (i / 2) as f64);
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}" class="legend">{}</text>"#,
            lx,
            ly - 4.0,
            lx + 14.0,
            ly - 4.0,
            lx + 18.0,
            ly,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

pub(crate) fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "–".into())
}

/// Everything a run's report is made of, read from the store.
pub struct RunReport {
    pub plan: RunPlan,
    pub rounds: Vec<RoundReport>,
    pub failures: Vec<FailureRecord>,
}

/// One round: its figures, its folds' reports, its out-of-fold predictions, and which slides
/// have a heatmap.
pub struct RoundReport {
    pub metrics: RoundMetrics,
    pub folds: Vec<FoldReport>,
    pub rows: Vec<Prediction>,
    /// A survival round's out-of-fold risks (its predictions table).
    pub survival_rows: Vec<crate::predictions::SurvivalRow>,
    pub heatmaps: BTreeSet<String>,
}

/// Read what the report needs: the plan, each round whose metrics are written, their folds.
pub async fn gather(store: &Store, run: &RunId) -> anyhow::Result<RunReport> {
    use anyhow::Context;
    let plan: RunPlan = store
        .get_json(&layout::run_plan(run))
        .await
        .with_context(|| format!("run {run}: no plan in {}", store.location()))?;
    let mut rounds = Vec::new();
    for round in 0..=plan.icmil_rounds() {
        let key = layout::round_metrics(run, round);
        if !store.exists(&key).await? {
            break;
        }
        let metrics: RoundMetrics = store.get_json(&key).await?;
        let mut folds = Vec::new();
        let mut rows = Vec::new();
        for k in 0..plan.folds.len() as u32 {
            let key = layout::fold_metrics(run, round, k);
            if store.exists(&key).await? {
                let f: FoldReport = store.get_json(&key).await?;
                rows.extend(f.predictions.iter().map(|p| Prediction::out_of_fold(p, k)));
                folds.push(f);
            }
        }
        let heatmaps = heatmaps_under(store, format!("{}/heatmaps", layout::round_dir(run, round))).await?;
        let survival_rows = if plan.task.survival().is_some() {
            rows.clear();
            crate::predictions::read_survival_csv(&store.get(&layout::predictions_csv(run, round)).await?)?
        } else {
            Vec::new()
        };
        rounds.push(RoundReport { metrics, folds, rows, survival_rows, heatmaps });
    }
    let mut failures = Vec::new();
    for key in store.list(&layout::failures_prefix(run)).await? {
        failures.push(store.get_json::<FailureRecord>(&key).await?);
    }
    failures.sort_by(|a, b| (a.kind.to_string(), &a.slide).cmp(&(b.kind.to_string(), &b.slide)));
    Ok(RunReport { plan, rounds, failures })
}

/// The slides with a heatmap (`<prefix>/<slide>.png`), one listing.
async fn heatmaps_under(store: &Store, prefix: String) -> anyhow::Result<BTreeSet<String>> {
    let keys = store.list(&object_store::path::Path::from(prefix)).await?;
    Ok(keys.iter().filter_map(|k| k.filename().and_then(|f| f.strip_suffix(".png")).map(String::from)).collect())
}

/// Gather and write `runs/<run>/report.html`; returns its key.
pub async fn write_run_report(store: &Store, run: &RunId) -> anyhow::Result<object_store::path::Path> {
    let report = gather(store, run).await?;
    // A survival round's Kaplan-Meier chart beside the page too, to put in a paper: SVG (vector)
    // and PNG (for what takes bitmaps).
    for round in &report.rounds {
        if let Some(sv) = &round.metrics.survival {
            let end = round.survival_rows.iter().filter_map(|r| r.follow_up.map(|t| t.time)).fold(0.0, f64::max);
            let svg = km_chart(sv, end).replacen("<svg ", "<svg style=\"font:14px system-ui,sans-serif\" ", 1);
            let key = object_store::path::Path::from(format!(
                "{}/kaplan-meier.svg",
                layout::round_dir(run, round.metrics.round)
            ));
            store.put(&key, svg.into_bytes()).await?;
            let key = object_store::path::Path::from(format!(
                "{}/kaplan-meier.png",
                layout::round_dir(run, round.metrics.round)
            ));
            store.put(&key, km_png(sv, end)).await?;
        }
    }
    let key = layout::run_report(run);
    store.put(&key, render(&report).into_bytes()).await?;
    Ok(key)
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:0 20px 40px;color:#222}\
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}\
h3{font-size:15px;margin:18px 0 6px}table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}.muted{color:#666}.charts{display:flex;flex-wrap:wrap;gap:10px}\
.chart{border:1px solid #eee;background:#fff}.ct{font-size:13px;font-weight:600}.tick{font-size:10px;fill:#555}.axis{font-size:11px}\
.legend{font-size:10px}.grid{stroke:#eee}.frame{fill:none;stroke:#999}.ref{stroke:#aaa;stroke-dasharray:4 3}\
.wrong{background:#fff1f0}img.hm{max-width:220px;max-height:160px;display:block}.cm td{min-width:48px}\
#filter{margin:6px 0;padding:3px 6px;width:260px}";

const SCRIPT: &str = "(function(){var f=document.getElementById('filter');var rows=document.querySelectorAll('#slides tbody tr');\
function apply(){var q=f.value.toLowerCase();var shown=0;rows.forEach(function(r){var ok=r.dataset.slide.toLowerCase().indexOf(q)>=0;\
r.style.display=ok?'':'none';if(ok)shown++;});document.getElementById('shown').textContent=shown;}\
if(f){f.addEventListener('input',apply);apply();}document.body.dataset.ready='1';})();";

/// The page.
pub fn render(r: &RunReport) -> String {
    let plan = &r.plan;
    let mut h = String::new();
    head(&mut h, &format!("Run {}", plan.run));
    // The cohort and settings.
    let counts: Vec<String> = plan
        .classes
        .iter()
        .enumerate()
        .map(|(c, name)| format!("{} {}", plan.slides.iter().filter(|s| s.label == c).count(), esc(name)))
        .collect();
    let features = match &plan.imported {
        Some(name) => format!("imported features <b>{}</b>", esc(name.as_str())),
        None => format!(
            "embedder <b>{}</b>, patches of {} px at {} µm/px",
            esc(&plan.embedder.architecture.name()),
            plan.tiling.patch_px,
            plan.tiling.target_mpp
        ),
    };
    let _ = write!(
        h,
        "<p><b>{}</b> slides ({}), {} fold{}, bag model <b>{}</b>, {}; {}.</p>",
        plan.slides.len(),
        counts.join(", "),
        plan.folds.len(),
        if plan.folds.len() == 1 { "" } else { "s" },
        plan.train.model.as_str(),
        features,
        match plan.icmil_rounds() {
            0 => "no ICMIL rounds".to_string(),
            1 => "1 ICMIL round after round 0".to_string(),
            n => format!("{n} ICMIL rounds after round 0"),
        }
    );
    training_settings(&mut h, plan);
    if r.rounds.is_empty() {
        h.push_str("<p class=\"muted\">No round has been predicted yet.</p>");
    } else if plan.task.is_classification() {
        rounds_table(&mut h, r);
    }
    for round in &r.rounds {
        round_section(&mut h, plan, round, r.rounds.len() > 1);
    }
    failures_section(&mut h, &r.failures);
    let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

/// How the bag model was trained, as the plan says.
fn training_settings(h: &mut String, plan: &RunPlan) {
    use clap::ValueEnum;
    let t = &plan.train;
    let optimizer = t.optimizer.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
    let mut parts = vec![
        format!("optimizer {optimizer}, learning rate {}, weight decay {}", t.lr, t.weight_decay),
        format!("at most {} epochs, stopping after {} without a better validation loss", t.max_epochs, t.patience),
        format!("dropout {}", t.dropout),
    ];
    if t.model == wsimil_common::models::BagModelKind::Transmil {
        parts.push(format!("{} Nyström landmarks", t.landmarks));
    }
    if t.grad_accumulation > 1 {
        parts.push(format!("gradients of {} bags per step", t.grad_accumulation));
    }
    if t.max_train_instances > 0 {
        parts.push(format!("training bags subsampled to {} patches", t.max_train_instances));
    }
    parts.push(format!("seed {}", t.seed));
    let _ = write!(h, "<p id=\"settings\">Training: {}.</p>", esc(&parts.join(", ")));
}

/// Every round's figures side by side.
fn rounds_table(h: &mut String, r: &RunReport) {
    h.push_str("<h2>Rounds</h2><table id=\"rounds\"><tr><th class=\"l\">round</th><th>slides predicted</th><th>pooled AUC</th><th>AUC, mean ± sd over folds</th><th>accuracy</th><th>balanced accuracy</th><th>F1</th><th>instance AUC</th><th>attention AUC</th></tr>");
    for round in &r.rounds {
        let m = &round.metrics;
        let p = m.pooled.as_ref();
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{} of {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if m.round == 0 { "0 (the embedder as given)".to_string() } else { format!("{} (ICMIL)", m.round) },
            m.predicted,
            m.slides,
            fmt(p.and_then(|p| p.auc)),
            m.auc.map(|a| format!("{:.3} ± {:.3}", a.mean, a.sd)).unwrap_or_else(|| "–".into()),
            fmt(p.map(|p| p.accuracy)),
            fmt(p.map(|p| p.balanced_accuracy)),
            fmt(p.map(|p| p.f1)),
            fmt(m.instance.as_ref().and_then(|i| i.instance_auc)),
            fmt(m.instance.as_ref().and_then(|i| i.attention_auc)),
        );
    }
    h.push_str("</table>");
}

fn round_section(h: &mut String, plan: &RunPlan, round: &RoundReport, several: bool) {
    let m = &round.metrics;
    if let Some(sv) = &m.survival {
        survival_section(h, round, sv);
        return;
    }
    let classes = &plan.classes;
    let _ = write!(
        h,
        "<h2 id=\"round-{r}\">Round {r}{}</h2>",
        if several && m.round > 0 { " (ICMIL)" } else { "" },
        r = m.round
    );
    patients_line(h, m);
    h.push_str("<div class=\"charts\">");
    let folds: Vec<u32> = round.folds.iter().map(|f| f.fold).collect();
    curves(h, classes, &round.rows, &folds);
    // Training curves.
    let mut series = Vec::new();
    let mut top: f64 = 0.0;
    for f in &round.folds {
        let pts: Vec<(f64, f64)> = f.curve.iter().map(|e| (e.epoch as f64, e.val_loss)).collect();
        top = pts.iter().map(|p| p.1).chain(f.curve.iter().map(|e| e.train_loss)).fold(top, f64::max);
        series.push(Series { name: format!("fold {} val", f.fold), points: pts, bold: false, dots: false });
    }
    let epochs = round.folds.iter().flat_map(|f| f.curve.iter().map(|e| e.epoch)).max().unwrap_or(0);
    if epochs > 0 && top.is_finite() {
        h.push_str(&line_chart(
            "Validation loss per epoch",
            ("epoch", "loss"),
            (0.0, (epochs.div_ceil(5) * 5) as f64),
            (0.0, top.max(1e-6)),
            None,
            &series,
        ));
    }
    h.push_str("</div>");
    confusion_table(h, classes, &round.rows);
    folds_table(h, &round.folds, ("test AUC", "accuracy"), &|f| {
        (fmt(f.test.as_ref().and_then(|t| t.auc)), fmt(f.test.as_ref().map(|t| t.accuracy)))
    });
    if let Some(i) = &m.instance {
        let _ = write!(
            h,
            "<h3>Where the lesions are</h3><p>{} slides with truth, {} patches of which {} lesion: instance AUC {}, attention AUC {}.</p>",
            i.slides,
            i.patches,
            i.lesion_patches,
            fmt(i.instance_auc),
            fmt(i.attention_auc)
        );
    }
    let id = if m.round == 0 { "slides".to_string() } else { format!("slides-{}", m.round) };
    let heat_dir = format!("round-{}/heatmaps", m.round);
    slides_table(h, classes, &round.rows, &heat_dir, &round.heatmaps, &id, m.round == 0);
}

/// A Kaplan-Meier curve as the points of its steps, from (0, 1) to `end`.
pub fn km_steps(curve: &[(f64, f64)], end: f64) -> Vec<(f64, f64)> {
    let mut pts = vec![(0.0, 1.0)];
    let mut last = 1.0;
    for &(t, s) in curve {
        pts.push((t, last));
        pts.push((t, s));
        last = s;
    }
    pts.push((end.max(pts.last().map_or(0.0, |p| p.0)), last));
    pts
}

/// The Kaplan-Meier chart of a survival round's two risk groups: its title and curves.
fn km_series(sv: &crate::run::SurvivalMetrics, end: f64) -> (String, Vec<Series>) {
    let series = [("high risk", &sv.high), ("low risk", &sv.low)]
        .iter()
        .map(|(name, g)| Series {
            name: format!("{name} ({} slides, {} events)", g.slides, g.events),
            points: km_steps(&g.kaplan_meier, end),
            bold: false,
            dots: false,
        })
        .collect::<Vec<_>>();
    (format!("Kaplan-Meier by risk group (log-rank p = {:.2e})", sv.log_rank_p), series)
}

/// The Kaplan-Meier chart of a survival round's two risk groups, as SVG.
pub fn km_chart(sv: &crate::run::SurvivalMetrics, end: f64) -> String {
    let (title, series) = km_series(sv, end);
    line_chart(&title, KM_AXES, (0.0, end.max(1e-9)), (0.0, 1.0), None, &series)
}

/// The same chart as PNG ([`crate::raster`]).
pub fn km_png(sv: &crate::run::SurvivalMetrics, end: f64) -> Vec<u8> {
    let (title, series) = km_series(sv, end);
    crate::raster::line_chart(&title, KM_AXES, (0.0, end.max(1e-9)), (0.0, 1.0), &series)
}

const KM_AXES: (&str, &str) = ("time", "survival");

/// A survival round: C-index, the risk groups' Kaplan-Meier curves, the folds, the slides ranked
/// by risk.
/// The round's figures per patient, where the manifest names patients.
fn patients_line(h: &mut String, m: &RoundMetrics) {
    if let Some(p) = &m.patients {
        let _ = write!(h, "<p id=\"patients-{}\">{}.</p>", m.round, esc(&p.describe()));
    }
}

fn survival_section(h: &mut String, round: &RoundReport, sv: &crate::run::SurvivalMetrics) {
    let m = &round.metrics;
    let _ = write!(h, "<h2 id=\"round-{r}\">Round {r}: survival</h2>", r = m.round);
    let ci = sv
        .c_index
        .as_ref()
        .map(|e| format!("{:.3} ({:.3}–{:.3})", e.value, e.ci95.0, e.ci95.1))
        .unwrap_or_else(|| "–".into());
    let _ = write!(
        h,
        "<table id=\"survival\"><tr><th class=\"l\">{} slides, {} events</th><th>C-index, pooled (95% CI)</th><th>C-index, mean ± sd over folds</th><th>log-rank χ²</th><th>p</th></tr><tr><td class=\"l\">out of fold</td><td>{ci}</td><td>{}</td><td>{:.2}</td><td>{:.2e}</td></tr></table>",
        sv.slides,
        sv.events,
        sv.c_index_folds.map(|v| v.to_string()).unwrap_or_else(|| "–".into()),
        sv.log_rank_chi2,
        sv.log_rank_p
    );
    patients_line(h, m);
    if !sv.td_auc.is_empty() {
        h.push_str("<table id=\"td-auc\"><tr><th class=\"l\">time-dependent AUC (cumulative/dynamic, IPCW), at the event times' quartiles</th>");
        for (t, _) in &sv.td_auc {
            let _ = write!(h, "<th>t = {t}</th>");
        }
        h.push_str("</tr><tr><td class=\"l\">out of fold, pooled</td>");
        for (_, a) in &sv.td_auc {
            let _ = write!(h, "<td>{}</td>", fmt(*a));
        }
        h.push_str("</tr></table>");
    }
    let end = round.survival_rows.iter().filter_map(|r| r.follow_up.map(|t| t.time)).fold(0.0, f64::max);
    h.push_str("<div class=\"charts\">");
    h.push_str(&km_chart(sv, end));
    h.push_str("</div>");
    let med = |g: &crate::run::RiskGroup| g.median_survival.map_or("not reached".into(), |t| format!("{t}"));
    let _ = write!(
        h,
        "<p>Test slides above their fold's training median risk are the high-risk group: median survival {} (high) against {} (low).</p>",
        med(&sv.high),
        med(&sv.low)
    );
    folds_table(h, &round.folds, ("test events", "C-index"), &|f| {
        let s = f.survival.as_ref();
        (s.map_or(0, |s| s.events).to_string(), fmt(s.and_then(|s| s.c_index)))
    });
    let heat_dir = format!("round-{}/heatmaps", m.round);
    survival_slides(h, &round.survival_rows, &heat_dir, &round.heatmaps);
}

/// The folds' sizes, epochs and seconds, with two figures of each.
fn folds_table(
    h: &mut String,
    folds: &[FoldReport],
    names: (&str, &str),
    figures: &dyn Fn(&FoldReport) -> (String, String),
) {
    let _ = write!(h, "<h3>Folds</h3><table><tr><th>fold</th><th>train / val / test slides</th><th>epochs (best)</th><th>{}</th><th>{}</th><th>seconds</th></tr>", names.0, names.1);
    for f in folds {
        let (a, b) = figures(f);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{} / {} / {}</td><td>{} ({})</td><td>{a}</td><td>{b}</td><td>{:.1}</td></tr>",
            f.fold, f.n_train, f.n_val, f.n_test, f.epochs_run, f.best_epoch, f.seconds
        );
    }
    h.push_str("</table>");
}

/// A slide's heatmap image (`<heat_dir>/<slide>.png`), where it has one.
fn heatmap_cell(heatmaps: &BTreeSet<String>, heat_dir: &str, slide: &str) -> String {
    if heatmaps.contains(slide) {
        format!(
            "<img class=\"hm\" loading=\"lazy\" alt=\"attention heatmap of {s}\" src=\"{heat_dir}/{s}.png\">",
            s = esc(slide)
        )
    } else {
        "<span class=\"muted\">no heatmap</span>".into()
    }
}

/// The slides ranked by risk, highest first, with their follow-up and heatmap.
fn survival_slides(
    h: &mut String,
    rows: &[crate::predictions::SurvivalRow],
    heat_dir: &str,
    heatmaps: &BTreeSet<String>,
) {
    let mut rows: Vec<&crate::predictions::SurvivalRow> = rows.iter().collect();
    rows.sort_by(|a, b| b.risk.total_cmp(&a.risk).then(a.slide.cmp(&b.slide)));
    h.push_str("<h3>Slides, highest risk first</h3><input id=\"filter\" type=\"search\" placeholder=\"filter slides by name\"> <span class=\"muted\"><span id=\"shown\"></span> shown</span><table id=\"slides\"><thead><tr><th>rank</th><th class=\"l\">slide</th><th>risk</th><th class=\"l\">group</th><th>time</th><th class=\"l\">event</th><th>fold</th><th class=\"l\">attention over the thumbnail</th></tr></thead><tbody>");
    for (i, r) in rows.iter().enumerate() {
        let img = heatmap_cell(heatmaps, heat_dir, &r.slide);
        let _ = write!(
            h,
            "<tr data-slide=\"{s}\"><td>{}</td><td class=\"l\">{s}</td><td>{:.3}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{img}</td></tr>",
            i + 1,
            r.risk,
            r.high_risk.map_or("", |g| if g { "high" } else { "low" }),
            r.follow_up.map(|t| t.time.to_string()).unwrap_or_default(),
            r.follow_up.map_or("", |t| if t.event { "event" } else { "censored" }),
            r.fold.map(|f| f.to_string()).unwrap_or_default(),
            s = esc(&r.slide),
        );
    }
    h.push_str("</tbody></table>");
}

/// ROC and precision-recall curves (binary: of the positive class, per fold when `folds` are
/// given, and pooled; more classes: one against the rest, pooled) and calibration, as charts.
fn curves(h: &mut String, classes: &[String], all: &[Prediction], folds: &[u32]) {
    let n_classes = classes.len();
    let rows: Vec<&Prediction> = all.iter().filter(|r| r.label.is_some()).collect();
    let scored = |rows: &[&Prediction], c: usize| -> (Vec<f64>, Vec<bool>) {
        (rows.iter().map(|r| r.probs[c]).collect(), rows.iter().map(|r| r.label == Some(c)).collect())
    };
    let mut roc = Vec::new();
    let mut pr = Vec::new();
    let mut add = |name: String, s: &[f64], y: &[bool], bold: bool| {
        let pts = roc_points(s, y);
        if !pts.is_empty() {
            roc.push(Series { name: format!("{name} ({:.3})", area(&pts)), points: pts, bold, dots: false });
        }
        let pts = pr_points(s, y);
        if !pts.is_empty() {
            pr.push(Series { name, points: pts, bold, dots: false });
        }
    };
    if n_classes == 2 {
        for &k in folds {
            let fold: Vec<&Prediction> = rows.iter().copied().filter(|r| r.fold == Some(k)).collect();
            let (s, y) = scored(&fold, 1);
            add(format!("fold {k}"), &s, &y, false);
        }
        let (s, y) = scored(&rows, 1);
        add("pooled".into(), &s, &y, !folds.is_empty());
    } else {
        for (c, name) in classes.iter().enumerate() {
            let (s, y) = scored(&rows, c);
            add(name.clone(), &s, &y, false);
        }
    }
    let positive = if n_classes == 2 { format!(" ({} positive)", classes[1]) } else { " (one vs rest)".into() };
    if roc.is_empty() {
        h.push_str("<p class=\"muted\">No ROC curve: the labelled slides do not hold every class.</p>");
    } else {
        h.push_str(&line_chart(
            &format!("ROC{positive}"),
            ("false positive rate", "true positive rate"),
            (0.0, 1.0),
            (0.0, 1.0),
            Some(((0.0, 0.0), (1.0, 1.0))),
            &roc,
        ));
        h.push_str(&line_chart(
            &format!("Precision-recall{positive}"),
            ("recall", "precision"),
            (0.0, 1.0),
            (0.0, 1.0),
            None,
            &pr,
        ));
    }
    // Calibration of the probability of the positive class (more classes: of the predicted one).
    let (probs, hits): (Vec<f64>, Vec<bool>) = if n_classes == 2 {
        rows.iter().map(|r| (r.probs[1], r.label == Some(1))).unzip()
    } else {
        rows.iter().map(|r| (r.probs[r.predicted()], r.label == Some(r.predicted()))).unzip()
    };
    let bins = calibration(&probs, &hits, 10);
    if !bins.is_empty() {
        let pts: Vec<(f64, f64)> = bins.iter().map(|b| (b.0, b.1)).collect();
        h.push_str(&line_chart(
            if n_classes == 2 { "Calibration" } else { "Calibration (predicted class)" },
            (if n_classes == 2 { "predicted probability" } else { "confidence" }, "observed fraction"),
            (0.0, 1.0),
            (0.0, 1.0),
            Some(((0.0, 0.0), (1.0, 1.0))),
            &[Series { name: "10 bins".into(), points: pts, bold: false, dots: true }],
        ));
    }
}

fn confusion_table(h: &mut String, classes: &[String], rows: &[Prediction]) {
    let cm = confusion(rows, classes.len());
    h.push_str("<h3>Confusion matrix (rows: truth, columns: predicted)</h3><table class=\"cm\"><tr><th></th>");
    for c in classes {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for (i, row) in cm.iter().enumerate() {
        let _ = write!(h, "<tr><th class=\"l\">{}</th>", esc(&classes[i]));
        for (j, v) in row.iter().enumerate() {
            let _ = write!(h, "<td{}>{v}</td>", if i != j && *v > 0 { " class=\"wrong\"" } else { "" });
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

/// Slides, worst error first (by the probability given to the true class, lowest first; slides
/// without a label after them, least confident first), with their heatmaps from `heat_dir`
/// (relative to the page) where `heatmaps` has them.
fn slides_table(
    h: &mut String,
    classes: &[String],
    rows: &[Prediction],
    heat_dir: &str,
    heatmaps: &BTreeSet<String>,
    id: &str,
    filter: bool,
) {
    let mut rows: Vec<&Prediction> = rows.iter().collect();
    let key = |r: &Prediction| match r.label {
        Some(l) => (0, r.probs[l]),
        None => (1, r.probs[r.predicted()]),
    };
    rows.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(a.slide.cmp(&b.slide))
    });
    let filter = if filter {
        "<input id=\"filter\" type=\"search\" placeholder=\"filter slides by name\"> <span class=\"muted\"><span id=\"shown\"></span> shown</span>"
    } else {
        ""
    };
    let _ = write!(
        h,
        "<h3>Slides, worst error first</h3>{filter}<table id=\"{id}\"><thead><tr><th>rank</th><th class=\"l\">slide</th><th class=\"l\">truth</th><th class=\"l\">predicted</th><th>p(truth)</th><th>fold</th><th class=\"l\">attention over the thumbnail</th></tr></thead><tbody>"
    );
    for (i, r) in rows.iter().enumerate() {
        let wrong = r.label.is_some_and(|l| l != r.predicted());
        let img = heatmap_cell(heatmaps, heat_dir, &r.slide);
        let _ = write!(
            h,
            "<tr data-slide=\"{s}\"{cls}><td>{}</td><td class=\"l\">{s}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td class=\"l\">{img}</td></tr>",
            i + 1,
            r.label.map(|l| esc(&classes[l])).unwrap_or_default(),
            esc(&classes[r.predicted()]),
            r.label.map(|l| format!("{:.3}", r.probs[l])).unwrap_or_else(|| "–".into()),
            r.fold.map(|f| f.to_string()).unwrap_or_default(),
            s = esc(&r.slide),
            cls = if wrong { " class=\"wrong\"" } else { "" },
        );
    }
    h.push_str("</tbody></table>");
}

fn failures_section(h: &mut String, failures: &[FailureRecord]) {
    let _ = write!(h, "<h2 id=\"failures\">Failures ({})</h2>", failures.len());
    if failures.is_empty() {
        h.push_str("<p class=\"muted\">No job failed.</p>");
        return;
    }
    h.push_str("<table><tr><th class=\"l\">stage</th><th class=\"l\">slide</th><th>attempts</th><th class=\"l\">reason</th></tr>");
    for f in failures {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            esc(&f.kind.to_string()),
            esc(f.slide.as_ref().map(|s| s.as_str()).unwrap_or("–")),
            f.attempts,
            esc(&f.reason)
        );
    }
    h.push_str("</table>");
}

fn head(h: &mut String, title: &str) {
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
}

/// `applied/<name>/report.html`: a model applied to new slides (`wsimil predict`).
pub async fn write_applied_report(store: &Store, name: &RunId) -> anyhow::Result<object_store::path::Path> {
    use anyhow::Context;
    let plan: wsimil_common::classifier::ApplyPlan = store
        .get_json(&layout::applied_plan(name))
        .await
        .with_context(|| format!("application {name}: no plan in {}", store.location()))?;
    let metrics: crate::apply::ApplyMetrics = store.get_json(&layout::applied_metrics(name)).await?;
    let csv = store.get(&layout::applied_predictions_csv(name)).await?;
    let heatmaps = heatmaps_under(store, format!("applied/{name}/heatmaps")).await?;
    let key = layout::applied_report(name);
    if !plan.head.is_classes() {
        let rows = crate::predictions::read_survival_csv(&csv)?;
        let mut h = String::new();
        head(&mut h, &format!("Application {}", plan.name));
        let _ = write!(
            h,
            "<p>Survival model <b>{}</b> on <b>{}</b> slides: {} given a risk, {} with follow-up ({} events): C-index {}.</p>",
            esc(plan.model.as_str()),
            metrics.slides,
            metrics.predicted,
            metrics.followed,
            metrics.events,
            metrics.c_index.as_ref().map_or("–".into(), |e| format!("{:.3} (95% CI {:.3}–{:.3})", e.value, e.ci95.0, e.ci95.1))
        );
        survival_slides(&mut h, &rows, "heatmaps", &heatmaps);
        failures_section(&mut h, &metrics.failures);
        let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
        store.put(&key, h.into_bytes()).await?;
        return Ok(key);
    }
    let rows = read_predictions_csv(&csv, &plan.classes)?;
    store.put(&key, render_applied(&plan, &metrics, &rows, &heatmaps).into_bytes()).await?;
    Ok(key)
}

/// A predictions CSV ([`crate::predictions`]) back as rows; the classes say the column order.
pub fn read_predictions_csv(bytes: &[u8], classes: &[String]) -> anyhow::Result<Vec<Prediction>> {
    let mut rd = csv::Reader::from_reader(bytes);
    let header = rd.headers()?.clone();
    let col = |name: &str| {
        header.iter().position(|h| h == name).ok_or_else(|| anyhow::anyhow!("predictions: no {name} column"))
    };
    let (slide_c, label_c) = (col("slide_id")?, col("label")?);
    let fold_c = header.iter().position(|h| h == "fold");
    let prob_c: Vec<usize> = classes.iter().map(|c| col(&format!("prob_{c}"))).collect::<anyhow::Result<_>>()?;
    let mut rows = Vec::new();
    for rec in rd.records() {
        let rec = rec?;
        let label = rec.get(label_c).filter(|l| !l.is_empty()).and_then(|l| classes.iter().position(|c| c == l));
        let fold = fold_c.and_then(|c| rec.get(c)).and_then(|f| f.parse().ok());
        let probs = prob_c.iter().map(|&c| rec.get(c).unwrap_or("").parse::<f64>()).collect::<Result<_, _>>()?;
        rows.push(Prediction { slide: rec.get(slide_c).unwrap_or("").to_string(), label, fold, probs });
    }
    Ok(rows)
}

/// The application's page.
pub fn render_applied(
    plan: &wsimil_common::classifier::ApplyPlan,
    m: &crate::apply::ApplyMetrics,
    rows: &[Prediction],
    heatmaps: &BTreeSet<String>,
) -> String {
    let mut h = String::new();
    head(&mut h, &format!("Application {}", plan.name));
    let _ = write!(
        h,
        "<p>Model <b>{}</b> (classes {}) on <b>{}</b> slides: {} predicted, {} of them labelled.</p>",
        esc(plan.model.as_str()),
        esc(&plan.classes.join(", ")),
        m.slides,
        m.predicted,
        m.labelled
    );
    if let Some(ci) = &m.metrics {
        let e = |e: &wsimil_common::metrics::Estimate| format!("{:.3} ({:.3}–{:.3})", e.value, e.ci95.0, e.ci95.1);
        let _ = write!(
            h,
            "<table id=\"metrics\"><tr><th class=\"l\">over {} labelled slides (95% CI, {} bootstrap resamples)</th><th>AUC</th><th>accuracy</th><th>balanced accuracy</th><th>F1</th></tr><tr><td class=\"l\"></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            ci.n,
            ci.bootstrap_reps,
            ci.auc.as_ref().map(e).unwrap_or_else(|| "–".into()),
            e(&ci.accuracy),
            e(&ci.balanced_accuracy),
            e(&ci.f1)
        );
        h.push_str("<div class=\"charts\">");
        curves(&mut h, &plan.classes, rows, &[]);
        h.push_str("</div>");
        confusion_table(&mut h, &plan.classes, rows);
    } else {
        h.push_str("<p class=\"muted\">No slide has a label: no metrics, the slides ranked least confident first.</p>");
    }
    slides_table(&mut h, &plan.classes, rows, "heatmaps", heatmaps, "slides", true);
    failures_section(&mut h, &m.failures);
    let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::metrics::binary_auc;

    #[test]
    fn the_area_under_the_roc_points_is_the_mann_whitney_auc_ties_included() {
        let scores = [0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.6, 0.3, 0.2, 0.1];
        let positive = [true, true, false, true, false, true, false, false, true, false];
        let pts = roc_points(&scores, &positive);
        assert_eq!((pts[0], *pts.last().unwrap()), ((0.0, 0.0), (1.0, 1.0)));
        assert_eq!(pts.len(), 8, "one point per distinct score, plus the origin");
        assert!((area(&pts) - binary_auc(&scores, &positive).unwrap()).abs() < 1e-12);
        assert!(roc_points(&scores, &[true; 10]).is_empty(), "no negatives, no curve");
    }

    #[test]
    fn precision_recall_walks_the_thresholds_highest_first() {
        let pts = pr_points(&[0.9, 0.8, 0.4, 0.3], &[true, false, true, false]);
        assert_eq!(pts, vec![(0.0, 1.0), (0.5, 1.0), (0.5, 0.5), (1.0, 2.0 / 3.0), (1.0, 0.5)]);
    }

    #[test]
    fn calibration_bins_hold_mean_predictions_and_observed_fractions() {
        let bins = calibration(&[0.05, 0.15, 0.12, 0.95, 1.0], &[false, true, false, true, true], 10);
        assert_eq!(bins.len(), 3);
        assert!((bins[0].0 - 0.05).abs() < 1e-12 && bins[0].1 == 0.0 && bins[0].2 == 1);
        assert!((bins[1].0 - 0.135).abs() < 1e-12 && bins[1].1 == 0.5 && bins[1].2 == 2);
        assert_eq!((bins[2].1, bins[2].2), (1.0, 2), "1.0 falls in the last bin");
    }

    #[test]
    fn the_confusion_matrix_counts_truth_by_prediction() {
        let p = |label, probs: [f64; 2]| Prediction {
            slide: "s".into(),
            label: Some(label),
            fold: None,
            probs: probs.to_vec(),
        };
        let rows = [p(0, [0.8, 0.2]), p(0, [0.3, 0.7]), p(1, [0.1, 0.9]), p(1, [0.4, 0.6])];
        assert_eq!(confusion(&rows, 2), vec![vec![1, 1], vec![0, 2]]);
    }

    #[test]
    fn text_from_the_cohort_is_escaped() {
        assert_eq!(esc("<b>\"x\" & y</b>"), "&lt;b&gt;&quot;x&quot; &amp; y&lt;/b&gt;");
        let svg = line_chart("a<b", ("x", "y"), (0.0, 1.0), (0.0, 1.0), None, &[]);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
    }
}
