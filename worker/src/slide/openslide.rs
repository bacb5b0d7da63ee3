//! OpenSlide through its C API, loaded with `dlopen` at first use: the binary builds and runs
//! without the library (every other stage works), and a missing library is a clear error naming
//! what to install rather than a link failure.

use super::{SlideError, SlideReader};
use image::RgbImage;
use libloading::Library;
use std::ffi::{c_char, c_double, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[repr(C)]
struct RawSlide {
    _private: [u8; 0],
}

struct Api {
    open: unsafe extern "C" fn(*const c_char) -> *mut RawSlide,
    close: unsafe extern "C" fn(*mut RawSlide),
    get_error: unsafe extern "C" fn(*mut RawSlide) -> *const c_char,
    level_count: unsafe extern "C" fn(*mut RawSlide) -> i32,
    level_dimensions: unsafe extern "C" fn(*mut RawSlide, i32, *mut i64, *mut i64),
    level_downsample: unsafe extern "C" fn(*mut RawSlide, i32) -> c_double,
    property_value: unsafe extern "C" fn(*mut RawSlide, *const c_char) -> *const c_char,
    read_region: unsafe extern "C" fn(*mut RawSlide, *mut u32, i64, i64, i32, i64, i64),
    detect_vendor: unsafe extern "C" fn(*const c_char) -> *const c_char,
    version: unsafe extern "C" fn() -> *const c_char,
    _lib: Library,
}

const LIBRARY_NAMES: [&str; 4] = ["libopenslide.so.1", "libopenslide.so.0", "libopenslide.so", "libopenslide.1.dylib"];

fn api() -> Result<&'static Api, SlideError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading OpenSlide runs only its own (trusted) initialisers.
            match unsafe { Library::new(name) } {
                Ok(lib) => return load_symbols(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(errors.join("; "))
    })
    .as_ref()
    .map_err(|e| SlideError::Library(e.clone()))
}

fn load_symbols(lib: Library) -> Result<Api, libloading::Error> {
    // SAFETY: the signatures match openslide.h (3.4 and 4.0 alike).
    unsafe {
        Ok(Api {
            open: *lib.get(b"openslide_open\0")?,
            close: *lib.get(b"openslide_close\0")?,
            get_error: *lib.get(b"openslide_get_error\0")?,
            level_count: *lib.get(b"openslide_get_level_count\0")?,
            level_dimensions: *lib.get(b"openslide_get_level_dimensions\0")?,
            level_downsample: *lib.get(b"openslide_get_level_downsample\0")?,
            property_value: *lib.get(b"openslide_get_property_value\0")?,
            read_region: *lib.get(b"openslide_read_region\0")?,
            detect_vendor: *lib.get(b"openslide_detect_vendor\0")?,
            version: *lib.get(b"openslide_get_version\0")?,
            _lib: lib,
        })
    }
}

fn owned(s: *const c_char) -> Option<String> {
    // SAFETY: OpenSlide returns NUL-terminated strings owned by the library or the handle.
    (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
}

/// The OpenSlide library version, if it can be loaded.
pub fn version() -> Result<String, SlideError> {
    let api = api()?;
    // SAFETY: no arguments; returns a static string.
    Ok(owned(unsafe { (api.version)() }).unwrap_or_default())
}

/// The vendor OpenSlide would read `path` as (`aperio`, `generic-tiff`, …), `None` if it does
/// not recognise the file; an error if the library is missing.
pub fn detect_vendor(path: &Path) -> Result<Option<String>, SlideError> {
    let api = api()?;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return Ok(None) };
    // SAFETY: c is a valid C string; the result is a static string or NULL.
    Ok(owned(unsafe { (api.detect_vendor)(c.as_ptr()) }))
}

/// An open slide. OpenSlide handles are thread-safe for reads, so one is shared by all threads.
pub struct OpenSlide {
    raw: *mut RawSlide,
    api: &'static Api,
    path: PathBuf,
    vendor: String,
    levels: Vec<((u64, u64), f64)>,
}

// SAFETY: openslide_t is documented as thread-safe; the handle is closed only in Drop.
unsafe impl Send for OpenSlide {}
unsafe impl Sync for OpenSlide {}

impl OpenSlide {
    pub fn open(path: &Path) -> Result<Self, SlideError> {
        let api = api()?;
        let fail = |reason: String| SlideError::Open { path: path.to_path_buf(), reason };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| fail("path holds a NUL byte".into()))?;
        // SAFETY: c is a valid C string for the duration of the calls.
        let vendor = owned(unsafe { (api.detect_vendor)(c.as_ptr()) });
        let raw = unsafe { (api.open)(c.as_ptr()) };
        if raw.is_null() {
            return Err(fail(match vendor {
                None => "not a format OpenSlide recognises".into(),
                Some(v) => format!("OpenSlide recognised a {v} file but could not open it"),
            }));
        }
        let mut slide =
            OpenSlide { raw, api, path: path.to_path_buf(), vendor: vendor.unwrap_or_default(), levels: Vec::new() };
        if let Some(e) = slide.error() {
            return Err(fail(e));
        }
        // SAFETY: raw is a live handle.
        let n = unsafe { (api.level_count)(raw) };
        if n <= 0 {
            return Err(fail(slide.error().unwrap_or_else(|| "slide has no levels".into())));
        }
        for l in 0..n {
            let (mut w, mut h) = (0i64, 0i64);
            // SAFETY: raw is live, l < level count, w/h are valid out-pointers.
            let ds = unsafe {
                (api.level_dimensions)(raw, l, &mut w, &mut h);
                (api.level_downsample)(raw, l)
            };
            if w <= 0 || h <= 0 {
                return Err(fail(format!("level {l} has no pixels ({w}x{h})")));
            }
            slide.levels.push(((w as u64, h as u64), ds));
        }
        Ok(slide)
    }

    fn error(&self) -> Option<String> {
        // SAFETY: raw is a live handle.
        owned(unsafe { (self.api.get_error)(self.raw) })
    }

    /// A property of the slide (e.g. `openslide.mpp-x`, `aperio.AppMag`).
    pub fn property(&self, name: &str) -> Option<String> {
        let c = CString::new(name).ok()?;
        // SAFETY: raw is live, c is a valid C string.
        owned(unsafe { (self.api.property_value)(self.raw, c.as_ptr()) })
    }

    fn property_f64(&self, name: &str) -> Option<f64> {
        self.property(name)?.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0)
    }
}

impl Drop for OpenSlide {
    fn drop(&mut self) {
        // SAFETY: raw came from openslide_open and is closed once.
        unsafe { (self.api.close)(self.raw) }
    }
}

impl SlideReader for OpenSlide {
    fn path(&self) -> &Path {
        &self.path
    }

    fn reader_name(&self) -> String {
        format!("openslide {} ({})", version().unwrap_or_default(), self.vendor)
    }

    fn level_count(&self) -> usize {
        self.levels.len()
    }

    fn level_dimensions(&self, level: usize) -> (u64, u64) {
        self.levels[level].0
    }

    fn level_downsample(&self, level: usize) -> f64 {
        self.levels[level].1
    }

    fn mpp(&self) -> Option<f64> {
        self.property_f64("openslide.mpp-x")
    }

    fn objective_power(&self) -> Option<f64> {
        self.property_f64("openslide.objective-power")
    }

    fn read_region(&self, x: i64, y: i64, level: usize, w: u32, h: u32) -> Result<RgbImage, SlideError> {
        let fail = |reason: String| SlideError::Read { path: self.path.clone(), level, x, y, w, h, reason };
        if level >= self.levels.len() {
            return Err(fail(format!("no level {level}")));
        }
        let n = w as usize * h as usize;
        let mut argb = vec![0u32; n];
        // SAFETY: argb holds w*h pixels as the API requires; raw is live.
        unsafe { (self.api.read_region)(self.raw, argb.as_mut_ptr(), x, y, level as i32, w as i64, h as i64) };
        if let Some(e) = self.error() {
            return Err(fail(e));
        }
        Ok(argb_to_rgb_over_white(&argb, w, h))
    }
}

/// OpenSlide's premultiplied ARGB composited over white: c + (255 − a).
pub fn argb_to_rgb_over_white(argb: &[u32], w: u32, h: u32) -> RgbImage {
    let mut out = Vec::with_capacity(argb.len() * 3);
    for &p in argb {
        let a = (p >> 24) as u8;
        let bg = 255 - a;
        for shift in [16, 8, 0] {
            out.push(((p >> shift) as u8).saturating_add(bg));
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer sized for the image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premultiplied_argb_composites_over_white() {
        let px = [0xFF_10_20_30u32, 0x00_00_00_00, 0x80_40_00_00];
        let img = argb_to_rgb_over_white(&px, 3, 1);
        assert_eq!(img.get_pixel(0, 0).0, [0x10, 0x20, 0x30]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(2, 0).0, [0x40 + 0x7F, 0x7F, 0x7F]);
    }
}
