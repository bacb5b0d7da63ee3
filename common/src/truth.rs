//! Patch-level truth: where the lesions of a slide are, for the instance-level figures of a run
//! (how well the classifier's attention and its instance path find them) and for ICMIL's
//! diagnostics.
//!
//! A slide's truth is given in the manifest's optional `truth` column, as either
//! - a **mask image** (PNG or JPEG) covering the whole slide at any downsample: pixels of 128 and
//!   above are lesion; the downsample is the slide's level-0 width over the mask's width (what
//!   `wsimil demo-cohort` writes, and what a CAMELYON16 annotation rasterised at level 5 or 6 is);
//! - a **GeoJSON** file (`.geojson`/`.json`): a FeatureCollection (or one Feature, or a bare
//!   geometry) of Polygons and MultiPolygons in level-0 pixel coordinates, holes included, as
//!   QuPath exports annotations. Rasterised at [`GEOJSON_DOWNSAMPLE`].
//!
//! A patch's truth is the fraction of it the lesion covers ([`Truth::coverage`]); a patch counts
//! as positive from half covered.

use crate::attention::AttentionMap;
use image::GrayImage;
use serde::{Deserialize, Serialize};

/// The resolution GeoJSON polygons are rasterised at, in level-0 pixels per mask pixel: a 256-px
/// patch at 20x (512 level-0 px at 40x) covers 32² mask pixels.
pub const GEOJSON_DOWNSAMPLE: f64 = 16.0;

/// From this fraction covered, a patch is a lesion patch.
pub const POSITIVE_COVERAGE: f32 = 0.5;

/// A slide's lesion mask and its downsample from level 0.
#[derive(Debug, Clone)]
pub struct Truth {
    pub mask: GrayImage,
    pub downsample: f64,
}

impl Truth {
    /// Check a truth file before any work (`name`, its path or URL, gives its kind by extension):
    /// a mask image that decodes, or GeoJSON whose shapes have an area. A GeoJSON document with no
    /// shapes at all (QuPath's export of a slide without annotations) declares a slide without
    /// lesions; one whose shapes are all points or lines marks no area, and is refused.
    pub fn validate(name: &str, bytes: &[u8]) -> Result<(), String> {
        if is_geojson(name) {
            let shapes = geojson_shapes(bytes).map_err(|e| format!("{name}: {e}"))?;
            if shapes.polygons.is_empty() && shapes.without_area > 0 {
                return Err(format!(
                    "{name}: {} shape(s), none a Polygon or MultiPolygon: points and lines mark no lesion area",
                    shapes.without_area
                ));
            }
            return Ok(());
        }
        image::load_from_memory(bytes)
            .map(|_| ())
            .map_err(|e| format!("{name}: not a mask image (PNG or JPEG) nor GeoJSON: {e}"))
    }

    /// Read a truth file (`name` is its path or URL, for messages and its extension) for a slide
    /// whose level 0 is `level0` = (width, height) pixels.
    pub fn from_bytes(name: &str, bytes: &[u8], level0: (u64, u64)) -> Result<Truth, String> {
        if is_geojson(name) {
            let polygons = geojson_shapes(bytes).map_err(|e| format!("{name}: {e}"))?.polygons;
            let ds = GEOJSON_DOWNSAMPLE;
            let (w, h) =
                (((level0.0 as f64) / ds).ceil().max(1.0) as u32, ((level0.1 as f64) / ds).ceil().max(1.0) as u32);
            return Ok(Truth { mask: rasterise(&polygons, w, h, ds), downsample: ds });
        }
        let mask = image::load_from_memory(bytes)
            .map_err(|e| format!("{name}: not a mask image (PNG or JPEG) nor GeoJSON: {e}"))?
            .to_luma8();
        if mask.width() == 0 || level0.0 == 0 {
            return Err(format!("{name}: an empty mask"));
        }
        let downsample = level0.0 as f64 / mask.width() as f64;
        let expected_h = level0.1 as f64 / downsample;
        if (mask.height() as f64 - expected_h).abs() > expected_h * 0.02 + 2.0 {
            return Err(format!(
                "{name}: a {}×{} mask is not the shape of a {}×{} slide (at downsample {downsample:.1} it would be {:.0} high)",
                mask.width(),
                mask.height(),
                level0.0,
                level0.1,
                expected_h
            ));
        }
        Ok(Truth { mask, downsample })
    }

    /// The fraction of each patch (level-0 top-left corner, side `patch` level-0 pixels) that the
    /// lesion covers.
    pub fn coverage(&self, xs: &[i64], ys: &[i64], patch: u64) -> Vec<f32> {
        let ds = self.downsample;
        let (mw, mh) = (self.mask.width() as i64, self.mask.height() as i64);
        let side = ((patch as f64 / ds).round() as i64).max(1);
        xs.iter()
            .zip(ys)
            .map(|(x, y)| {
                let (x0, y0) = ((*x as f64 / ds).floor() as i64, (*y as f64 / ds).floor() as i64);
                let (mut on, mut all) = (0u32, 0u32);
                for yy in y0.max(0)..(y0 + side).min(mh) {
                    for xx in x0.max(0)..(x0 + side).min(mw) {
                        all += 1;
                        // Half-grey and above: JPEG's ringing around a mask's edges is not lesion.
                        on += (self.mask.get_pixel(xx as u32, yy as u32).0[0] >= 128) as u32;
                    }
                }
                if all == 0 {
                    0.0
                } else {
                    on as f32 / all as f32
                }
            })
            .collect()
    }
}

fn is_geojson(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".geojson") || lower.ends_with(".json")
}

/// How well a round's classifier finds the lesions, over the test patches of slides with truth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InstanceMetrics {
    /// Slides with truth, their patches, and of those the lesion patches (half covered or more).
    pub slides: usize,
    pub patches: usize,
    pub lesion_patches: usize,
    /// The instance path's probability of the positive class against lesion, pooled over every
    /// patch of those slides (negative slides' patches included): patch classification.
    pub instance_auc: Option<f64>,
    /// The attention, min-max normalised within each slide, against lesion, pooled over the
    /// patches of slides that have lesion patches: where the classifier looks. (Attention is
    /// relative within a bag, so slides without lesions say nothing about it.)
    pub attention_auc: Option<f64>,
}

/// The instance-level figures of slides' attention maps ([`AttentionMap::truth`] set); `None`
/// when no map has truth.
pub fn instance_metrics(maps: &[AttentionMap]) -> Option<InstanceMetrics> {
    let mut figures = InstanceFigures::default();
    maps.iter().for_each(|m| figures.add(m));
    figures.finish()
}

/// [`instance_metrics`] one map at a time: what it keeps of a map is a score and a flag per patch,
/// so a cohort's figures never need its maps in memory together.
#[derive(Default)]
pub struct InstanceFigures {
    slides: usize,
    patches: usize,
    lesion_patches: usize,
    /// Instance-path probability and lesion flag of every patch of the slides with truth.
    instance: Vec<(f32, bool)>,
    /// Attention min-maxed within its slide, of every patch of the slides with a lesion.
    attention: Vec<(f32, bool)>,
    /// Whether every map with truth had instance-path probabilities.
    missing_instance: bool,
}

impl InstanceFigures {
    pub fn add(&mut self, map: &AttentionMap) {
        let Some(truth) = &map.truth else { return };
        let lesion: Vec<bool> = truth.iter().map(|c| *c >= POSITIVE_COVERAGE).collect();
        self.slides += 1;
        self.patches += lesion.len();
        self.lesion_patches += lesion.iter().filter(|l| **l).count();
        match &map.instance {
            Some(p) => self.instance.extend(p.iter().copied().zip(lesion.iter().copied())),
            None => self.missing_instance = true,
        }
        if lesion.iter().any(|l| *l) {
            let (lo, hi) =
                map.attention.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &a| (l.min(a), h.max(a)));
            let span = if hi > lo { hi - lo } else { 1.0 };
            self.attention.extend(map.attention.iter().map(|a| (a - lo) / span).zip(lesion.iter().copied()));
        }
    }

    pub fn finish(self) -> Option<InstanceMetrics> {
        if self.slides == 0 {
            return None;
        }
        let auc = |pairs: &[(f32, bool)]| {
            let (scores, truth): (Vec<f64>, Vec<bool>) = pairs.iter().map(|&(s, t)| (s as f64, t)).unzip();
            crate::metrics::binary_auc(&scores, &truth)
        };
        Some(InstanceMetrics {
            slides: self.slides,
            patches: self.patches,
            lesion_patches: self.lesion_patches,
            instance_auc: if self.missing_instance { None } else { auc(&self.instance) },
            attention_auc: auc(&self.attention),
        })
    }
}

/// A polygon: its outer ring then its holes, each a list of (x, y) level-0 points.
type Polygon = Vec<Vec<(f64, f64)>>;

/// The shapes of a GeoJSON document: its Polygons and MultiPolygons, and a count of the others.
#[derive(Default)]
struct Shapes {
    polygons: Vec<Polygon>,
    /// Points and lines: shapes that mark no area.
    without_area: usize,
}

fn geojson_shapes(bytes: &[u8]) -> Result<Shapes, String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let mut out = Shapes::default();
    collect(&doc, &mut out)?;
    Ok(out)
}

fn collect(v: &serde_json::Value, out: &mut Shapes) -> Result<(), String> {
    let ring = |r: &serde_json::Value| -> Result<Vec<(f64, f64)>, String> {
        r.as_array()
            .ok_or("a ring is not an array of points")?
            .iter()
            .map(|p| {
                match p.as_array().map(|a| (a.first().and_then(|v| v.as_f64()), a.get(1).and_then(|v| v.as_f64()))) {
                    Some((Some(x), Some(y))) => Ok((x, y)),
                    _ => Err(format!("a point is not [x, y]: {p}")),
                }
            })
            .collect()
    };
    let polygon = |p: &serde_json::Value| -> Result<Polygon, String> {
        p.as_array().ok_or("Polygon coordinates are not an array of rings")?.iter().map(ring).collect()
    };
    match v.get("type").and_then(|t| t.as_str()) {
        Some("FeatureCollection") => {
            for f in v.get("features").and_then(|f| f.as_array()).ok_or("a FeatureCollection without features")? {
                collect(f, out)?;
            }
        }
        Some("Feature") => {
            if let Some(g) = v.get("geometry").filter(|g| !g.is_null()) {
                collect(g, out)?;
            }
        }
        Some("GeometryCollection") => {
            for g in v.get("geometries").and_then(|g| g.as_array()).ok_or("a GeometryCollection without geometries")? {
                collect(g, out)?;
            }
        }
        Some("Polygon") => out.polygons.push(polygon(v.get("coordinates").ok_or("a Polygon without coordinates")?)?),
        Some("MultiPolygon") => {
            for p in v.get("coordinates").and_then(|c| c.as_array()).ok_or("a MultiPolygon without coordinates")? {
                out.polygons.push(polygon(p)?);
            }
        }
        // Points and lines mark no area.
        Some(_) => out.without_area += 1,
        None => {
            // QuPath writes a bare array of Features too.
            if let Some(items) = v.as_array() {
                for f in items {
                    collect(f, out)?;
                }
            } else {
                return Err("no GeoJSON type".into());
            }
        }
    }
    Ok(())
}

/// Fill `polygons` (even-odd within each, so holes stay empty) into a `w`×`h` mask whose pixel
/// (i, j) is the level-0 square at (i·ds, j·ds): a pixel is on when its centre is inside.
fn rasterise(polygons: &[Polygon], w: u32, h: u32, ds: f64) -> GrayImage {
    let mut mask = GrayImage::new(w, h);
    let mut xs: Vec<f64> = Vec::new();
    for poly in polygons {
        let (lo, hi) =
            poly.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| (lo.min(y), hi.max(y)));
        if !lo.is_finite() {
            continue;
        }
        let (r0, r1) = (((lo / ds) - 0.5).floor().max(0.0) as u32, (((hi / ds) - 0.5).ceil().max(0.0) as u32).min(h));
        for row in r0..r1 {
            let yc = (row as f64 + 0.5) * ds;
            xs.clear();
            for ring in poly {
                for (k, &(x1, y1)) in ring.iter().enumerate() {
                    let (x2, y2) = ring[(k + 1) % ring.len()];
                    if (y1 <= yc) != (y2 <= yc) {
                        xs.push(x1 + (yc - y1) / (y2 - y1) * (x2 - x1));
                    }
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks_exact(2) {
                // Pixels whose centre (c + 0.5)·ds lies in [pair[0], pair[1]).
                let c0 = ((pair[0] / ds) - 0.5).ceil().max(0.0) as u32;
                let c1 = (((pair[1] / ds) - 0.5).ceil().max(0.0) as u32).min(w);
                for c in c0..c1 {
                    mask.put_pixel(c, row, image::Luma([255]));
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(mask: &GrayImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageLuma8(mask.clone())
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_mask_image_gives_each_patch_its_covered_fraction() {
        // A 1024×512 slide, its mask at downsample 16 (64×32), the left quarter lesion.
        let mask = GrayImage::from_fn(64, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]));
        let t = Truth::from_bytes("m.png", &png(&mask), (1024, 512)).unwrap();
        assert_eq!(t.downsample, 16.0);
        // 128-px patches: at x 0 (inside), 192 (half: columns 12..20, 4 of 8 on), 512 (outside).
        let c = t.coverage(&[0, 192, 512], &[0, 0, 0], 128);
        assert_eq!(c, vec![1.0, 0.5, 0.0]);
        // A mask of another slide's shape is refused, naming both.
        let e = Truth::from_bytes("m.png", &png(&mask), (1024, 1024)).unwrap_err();
        assert!(e.contains("64×32 mask is not the shape of a 1024×1024 slide"), "{e}");
        assert!(Truth::from_bytes("m.png", b"no image", (1024, 512)).unwrap_err().contains("not a mask image"));
    }

    fn map(attention: &[f32], instance: &[f32], truth: &[f32]) -> AttentionMap {
        AttentionMap {
            xs: vec![0; attention.len()],
            ys: vec![0; attention.len()],
            attention: attention.to_vec(),
            instance: Some(instance.to_vec()),
            truth: Some(truth.to_vec()),
            provenance: crate::attention::PredictionProvenance {
                slide: "s".into(),
                round: 0,
                fold: 0,
                classes: vec!["normal".into(), "tumor".into()],
                label: None,
                probs: vec![0.5, 0.5],
                model: "abmil".into(),
                embedder: "e".into(),
            },
        }
    }

    #[test]
    fn instance_figures_pool_patches_and_read_attention_within_each_slide() {
        // A positive slide whose attention ranks its two lesion patches first, and a negative slide
        // whose attention is higher everywhere (it is relative within a bag: left out).
        let pos = map(&[0.5, 0.3, 0.1, 0.1], &[0.9, 0.4, 0.2, 0.6], &[1.0, 0.6, 0.0, 0.2]);
        let neg = map(&[0.9, 0.95], &[0.1, 0.3], &[0.0, 0.0]);
        let no_truth = AttentionMap { truth: None, ..map(&[1.0], &[1.0], &[1.0]) };
        let m = instance_metrics(&[pos, neg, no_truth]).unwrap();
        assert_eq!((m.slides, m.patches, m.lesion_patches), (2, 6, 2));
        assert_eq!(m.attention_auc, Some(1.0));
        // Instance: lesion 0.9, 0.4 against 0.2, 0.6, 0.1, 0.3: 7 of 8 pairs ordered.
        assert_eq!(m.instance_auc, Some(7.0 / 8.0));
        assert_eq!(instance_metrics(&[map(&[0.1], &[0.1], &[0.0])]).unwrap().attention_auc, None, "no lesion: no AUC");
        assert!(instance_metrics(&[]).is_none());
    }

    #[test]
    fn qupath_geojson_polygons_are_filled_with_their_holes_left_out() {
        // A 512×512 square from (256, 256) with a 128×128 hole at its centre, and a triangle far off.
        let doc = r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
             "geometry": {"type": "Polygon", "coordinates": [
                [[256, 256], [768, 256], [768, 768], [256, 768], [256, 256]],
                [[448, 448], [576, 448], [576, 576], [448, 576], [448, 448]]]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": [
                [[[1600, 1600], [1800, 1600], [1600, 1800], [1600, 1600]]]]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [5, 5]}}
        ]}"#;
        let t = Truth::from_bytes("a.geojson", doc.as_bytes(), (2048, 2048)).unwrap();
        assert_eq!((t.mask.width(), t.mask.height()), (128, 128));
        let c = t.coverage(&[256, 448, 0, 1600, 512], &[256, 448, 0, 1600, 256], 128);
        assert_eq!(c[0], 1.0, "inside the square");
        assert_eq!(c[1], 0.0, "the hole");
        assert_eq!(c[2], 0.0, "outside");
        // The triangle's hypotenuse x + y = 3400 cuts the patch's far corner (a 56-px right triangle
        // of 128²): 90% covered, to the mask's resolution.
        assert!(c[3] > 0.8 && c[3] < 0.97, "{}", c[3]);
        // Between the square's edge and the hole: (512..640, 256..384) is inside.
        assert_eq!(c[4], 1.0);
        let e = Truth::from_bytes("a.geojson", br#"{"type": "Polygon", "coordinates": [[[0, 0], "x"]]}"#, (64, 64))
            .unwrap_err();
        assert!(e.starts_with("a.geojson: a point is not [x, y]"), "{e}");
    }

    /// QuPath exports a slide without annotations as an empty FeatureCollection (or an empty
    /// array): that declares a lesion-free slide, every patch negative. Shapes that are all points
    /// or lines mark no area and are refused, named.
    #[test]
    fn an_empty_annotation_is_a_slide_without_lesions() {
        for doc in [r#"{"type": "FeatureCollection", "features": []}"#, "[]"] {
            Truth::validate("n.geojson", doc.as_bytes()).unwrap();
            let t = Truth::from_bytes("n.geojson", doc.as_bytes(), (1024, 512)).unwrap();
            assert_eq!((t.mask.width(), t.mask.height()), (64, 32));
            assert!(t.coverage(&[0, 512, 768], &[0, 256, 256], 256).iter().all(|c| *c == 0.0), "{doc}");
        }
        let points = r#"{"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}},
            {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[5, 5], [9, 9]]}}]}"#;
        let e = Truth::validate("p.geojson", points.as_bytes()).unwrap_err();
        assert!(e.starts_with("p.geojson: 2 shape(s), none a Polygon or MultiPolygon"), "{e}");
    }
}
