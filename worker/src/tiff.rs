//! A minimal writer of tiled, pyramidal TIFF slides in Aperio's layout (what OpenSlide's `aperio`
//! reader and every viewer open): one tiled directory per level, 4× downsampling between levels,
//! JPEG (YCbCr 4:2:0) tiles, and an `Aperio …|AppMag = 20|MPP = 0.499` ImageDescription carrying
//! magnification and microns per pixel.
//!
//! Used to write the semi-synthetic demo cohort and benchmark slides: classic TIFF by default,
//! BigTIFF (8-byte offsets, as scanners write slides over 4 GiB) on request.

use crate::resample::resize_rgb;
use image::RgbImage;
use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use std::io::Write;

#[derive(Debug, Clone)]
pub struct TiffOptions {
    pub tile: u32,
    pub quality: u8,
    pub mpp: f64,
    pub magnification: f64,
    /// Stop adding levels once the longer side is at most this.
    pub min_level_side: u32,
    /// Write BigTIFF instead of classic TIFF.
    pub bigtiff: bool,
}

impl Default for TiffOptions {
    fn default() -> Self {
        TiffOptions { tile: 256, quality: 85, mpp: 0.499, magnification: 20.0, min_level_side: 512, bigtiff: false }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TiffError {
    #[error("JPEG encoding failed: {0}")]
    Jpeg(#[from] jpeg_encoder::EncodingError),
    #[error("slide too large for classic TIFF ({0} bytes): write BigTIFF")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn encode_tile(img: &RgbImage, tx: u32, ty: u32, tile: u32, quality: u8) -> Result<Vec<u8>, TiffError> {
    // Edge tiles are padded by replicating the last row/column (as scanners do).
    let (w, h) = img.dimensions();
    let mut data = Vec::with_capacity((tile * tile * 3) as usize);
    for y in 0..tile {
        let sy = (ty * tile + y).min(h - 1);
        for x in 0..tile {
            let sx = (tx * tile + x).min(w - 1);
            data.extend_from_slice(&img.get_pixel(sx, sy).0);
        }
    }
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, quality);
    enc.set_sampling_factor(SamplingFactor::R_4_2_0);
    enc.encode(&data, tile as u16, tile as u16, ColorType::Rgb)?;
    Ok(out)
}

/// An IFD entry: tag, type (3 SHORT, 4 LONG, 2 ASCII), values as little-endian bytes, count.
struct Entry {
    tag: u16,
    typ: u16,
    count: u32,
    bytes: Vec<u8>,
}

fn shorts(tag: u16, v: &[u16]) -> Entry {
    Entry { tag, typ: 3, count: v.len() as u32, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

fn longs(tag: u16, v: &[u32]) -> Entry {
    Entry { tag, typ: 4, count: v.len() as u32, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

/// Tile offsets and byte counts: LONG in classic TIFF, LONG8 in BigTIFF.
fn offset_entry(tag: u16, v: &[u64], big: bool) -> Entry {
    if big {
        Entry { tag, typ: 16, count: v.len() as u32, bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
    } else {
        longs(tag, &v.iter().map(|x| *x as u32).collect::<Vec<_>>())
    }
}

fn ascii(tag: u16, s: &str) -> Entry {
    let mut bytes = s.as_bytes().to_vec();
    bytes.push(0);
    Entry { tag, typ: 2, count: bytes.len() as u32, bytes }
}

/// The levels of the pyramid: the image, then 4× smaller until the longer side fits `min_side`.
pub fn pyramid(img: &RgbImage, min_side: u32) -> Vec<RgbImage> {
    let mut levels = vec![img.clone()];
    loop {
        let last = levels.last().expect("non-empty");
        let (w, h) = last.dimensions();
        if w.max(h) <= min_side || w < 4 || h < 4 {
            break;
        }
        let next = resize_rgb(last, w.div_ceil(4), h.div_ceil(4));
        levels.push(next);
    }
    levels
}

/// One level of a slide to write.
pub enum LevelData {
    Image(RgbImage),
    /// A level of `width × height` whose every tile is `tile`: stored once, pointed to by every
    /// tile offset (TIFF allows it), so huge test slides take kilobytes.
    Repeated {
        width: u32,
        height: u32,
        tile: RgbImage,
    },
}

impl LevelData {
    fn dimensions(&self) -> (u32, u32) {
        match self {
            LevelData::Image(i) => i.dimensions(),
            LevelData::Repeated { width, height, .. } => (*width, *height),
        }
    }
}

/// Encode `img` as an Aperio-style pyramidal TIFF.
pub fn write_slide(img: &RgbImage, name: &str, opt: &TiffOptions) -> Result<Vec<u8>, TiffError> {
    let levels: Vec<LevelData> = pyramid(img, opt.min_level_side).into_iter().map(LevelData::Image).collect();
    write_levels(&levels, name, opt)
}

/// Encode given levels (largest first) as an Aperio-style TIFF (classic TIFF: up to 4 GiB; BigTIFF
/// when `opt.bigtiff`).
pub fn write_levels(levels: &[LevelData], name: &str, opt: &TiffOptions) -> Result<Vec<u8>, TiffError> {
    let (w0, h0) = levels[0].dimensions();
    let description = format!(
        "Aperio Image Library v12.0.15 wsimil-synth\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({t}x{t}) JPEG/RGB Q={q}|AppMag = {m}|MPP = {mpp:.4}|Filename = {name}",
        t = opt.tile,
        q = opt.quality,
        m = opt.magnification,
        mpp = opt.mpp
    );
    let big = opt.bigtiff;
    // The width of an offset (and of an in-entry value).
    let word = if big { 8 } else { 4 };
    let mut file: Vec<u8> = if big { b"II+\0\x08\0\0\0".to_vec() } else { b"II*\0".to_vec() };
    let mut prev_next_ptr = file.len(); // where the offset of the next IFD goes
    file.resize(file.len() + word, 0);
    let put_word = |file: &mut Vec<u8>, at: usize, v: u64| {
        if big {
            file[at..at + 8].copy_from_slice(&v.to_le_bytes());
        } else {
            file[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
        }
    };
    for (li, level) in levels.iter().enumerate() {
        let (w, h) = level.dimensions();
        let (tx, ty) = (w.div_ceil(opt.tile), h.div_ceil(opt.tile));
        let mut offsets = Vec::new();
        let mut counts = Vec::new();
        match level {
            LevelData::Image(img) => {
                for y in 0..ty {
                    for x in 0..tx {
                        let t = encode_tile(img, x, y, opt.tile, opt.quality)?;
                        if file.len() % 2 == 1 {
                            file.push(0);
                        }
                        offsets.push(file.len() as u64);
                        counts.push(t.len() as u64);
                        file.extend_from_slice(&t);
                    }
                }
            }
            LevelData::Repeated { tile, .. } => {
                let t = encode_tile(tile, 0, 0, opt.tile, opt.quality)?;
                if file.len() % 2 == 1 {
                    file.push(0);
                }
                let at = file.len() as u64;
                file.extend_from_slice(&t);
                offsets = vec![at; (tx * ty) as usize];
                counts = vec![t.len() as u64; (tx * ty) as usize];
            }
        }
        let mut entries = vec![
            longs(254, &[if li == 0 { 0 } else { 1 }]),
            longs(256, &[w]),
            longs(257, &[h]),
            shorts(258, &[8, 8, 8]),
            shorts(259, &[7]),
            shorts(262, &[6]),
            ascii(
                270,
                &if li == 0 { description.clone() } else { format!("Aperio Image Library wsimil-synth level {li}") },
            ),
            shorts(277, &[3]),
            shorts(284, &[1]),
            longs(322, &[opt.tile]),
            longs(323, &[opt.tile]),
            offset_entry(324, &offsets, big),
            offset_entry(325, &counts, big),
            shorts(530, &[2, 2]),
        ];
        entries.sort_by_key(|e| e.tag);
        // Values longer than a word go before the IFD.
        let mut value_offsets = Vec::new();
        for e in &entries {
            if e.bytes.len() > word {
                if file.len() % 2 == 1 {
                    file.push(0);
                }
                value_offsets.push(Some(file.len() as u64));
                file.extend_from_slice(&e.bytes);
            } else {
                value_offsets.push(None);
            }
        }
        if file.len() % 2 == 1 {
            file.push(0);
        }
        let ifd_at = file.len() as u64;
        put_word(&mut file, prev_next_ptr, ifd_at);
        if big {
            file.write_all(&(entries.len() as u64).to_le_bytes())?;
        } else {
            file.write_all(&(entries.len() as u16).to_le_bytes())?;
        }
        for (e, off) in entries.iter().zip(value_offsets) {
            file.write_all(&e.tag.to_le_bytes())?;
            file.write_all(&e.typ.to_le_bytes())?;
            if big {
                file.write_all(&(e.count as u64).to_le_bytes())?;
            } else {
                file.write_all(&e.count.to_le_bytes())?;
            }
            let mut v = match off {
                Some(o) => o.to_le_bytes().to_vec(),
                None => e.bytes.clone(),
            };
            v.resize(word, 0);
            file.write_all(&v)?;
        }
        prev_next_ptr = file.len();
        file.resize(file.len() + word, 0);
        if !big && file.len() > u32::MAX as usize {
            return Err(TiffError::TooLarge(file.len()));
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyramid_levels_shrink_by_four_until_small() {
        let img = RgbImage::new(3000, 2000);
        let dims: Vec<_> = pyramid(&img, 512).iter().map(|l| l.dimensions()).collect();
        assert_eq!(dims, vec![(3000, 2000), (750, 500), (188, 125)]);
    }

    #[test]
    fn header_and_first_ifd_are_well_formed() {
        let img = RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 150]));
        let bytes = write_slide(&img, "t", &TiffOptions { min_level_side: 1000, ..TiffOptions::default() }).unwrap();
        assert_eq!(&bytes[0..4], b"II*\0");
        let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let n = u16::from_le_bytes(bytes[ifd..ifd + 2].try_into().unwrap());
        assert_eq!(n, 14);
        // Entries are sorted by tag, as TIFF requires.
        let tags: Vec<u16> = (0..n as usize)
            .map(|i| u16::from_le_bytes(bytes[ifd + 2 + i * 12..ifd + 4 + i * 12].try_into().unwrap()))
            .collect();
        assert!(tags.windows(2).all(|w| w[0] < w[1]));
        // One level only, so the next-IFD pointer is 0.
        let next = ifd + 2 + 12 * n as usize;
        assert_eq!(u32::from_le_bytes(bytes[next..next + 4].try_into().unwrap()), 0);
    }
}
