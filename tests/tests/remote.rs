//! Slides that live only in a bucket (`s3://` paths, the manifest itself in the bucket), read by
//! the binaries as users run them against the real S3 server: the features are exactly those of
//! the same slides read from disk (native reader by ranged reads; OpenSlide from the scratch
//! folder), embedded and through NATS; missing and refused objects are listed before any work;
//! broken ones fail alone, named by their URL.

mod support;

use object_store::path::Path as Key;
use std::path::Path;
use support::*;
use wsimil_common::features::FeatureBag;
use wsimil_common::store::Store;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Run `wsimil` to completion; its output, or a panic with it.
fn ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn until_embed(manifest: &str, store: &[String]) -> Vec<String> {
    let mut a = run_flags(Path::new(manifest), &["--until", "embed", "--run", "r"]);
    a.extend(store.iter().cloned());
    a
}

/// Every feature bag of a store, by slide: (xs, ys, feature bits).
async fn features(store: &Store) -> Vec<(String, Vec<i64>, Vec<i64>, Vec<u32>)> {
    let mut out = Vec::new();
    for key in store.list(&Key::from("features")).await.unwrap() {
        let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
        let bits = bag.features.iter().map(|f| f.to_bits()).collect();
        out.push((bag.provenance.slide.clone(), bag.xs.clone(), bag.ys.clone(), bits));
    }
    out.sort();
    out
}

/// Where each bag's slide was read from, and by which reader.
async fn sources(store: &Store) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in store.list(&Key::from("features")).await.unwrap() {
        let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
        let t = bag.provenance.tiling.expect("tiling provenance");
        out.push((t.source_path, t.reader));
    }
    out
}

/// The cohort's slides uploaded under `s3://<bucket>/<prefix>/slides/`, with a manifest of
/// relative paths beside them; returns the manifest's URL.
async fn upload_cohort(s3: &S3, local_manifest: &Path, bucket: &str, prefix: &str) -> String {
    let store = s3.open(&format!("s3://{bucket}/{prefix}"));
    let text = std::fs::read_to_string(local_manifest).unwrap();
    let mut csv = String::from("slide_id,path,label\n");
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let name = Path::new(f[1]).file_name().unwrap().to_str().unwrap();
        store.put(&Key::from(format!("slides/{name}")), std::fs::read(f[1]).unwrap()).await.unwrap();
        csv.push_str(&format!("{},slides/{name},{}\n", f[0], f[2]));
    }
    store.put(&Key::from("cohort/manifest.csv"), csv.replace(",slides/", ",../slides/")).await.unwrap();
    format!("s3://{bucket}/{prefix}/cohort/manifest.csv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slides_only_in_a_bucket_embed_exactly_as_from_disk_embedded_and_through_nats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 3, 1024, 1280, false);
    let s3 = s3();
    // The slides in a bucket of their own, apart from the output store's.
    let remote_manifest = upload_cohort(s3, &manifest, "wsimil-slides", "remote-cohort").await;
    let s3_flags = |prefix: &str| s3.flags(prefix);
    let local_store = |name: &str| vec!["--store".to_string(), d.join(name).display().to_string()];

    // From disk, and from the bucket, native reader (ranged reads), embedded.
    ok(wsimil().args(until_embed(manifest.to_str().unwrap(), &local_store("disk"))), "run from disk");
    let out = ok(wsimil().args(until_embed(&remote_manifest, &s3_flags("remote-embedded"))), "run from the bucket");
    assert!(out.contains("3 slides"), "{out}");
    let disk = features(&Store::open(d.join("disk").to_str().unwrap(), &Default::default()).unwrap()).await;
    assert_eq!(disk.len(), 3);
    assert_eq!(features(&s3.store("remote-embedded")).await, disk, "features from the bucket differ from disk's");
    for (path, reader) in sources(&s3.store("remote-embedded")).await {
        assert!(path.starts_with("s3://wsimil-slides/remote-cohort/slides/"), "{path}");
        assert!(reader.contains("native") && !reader.contains("scratch"), "{reader}");
    }

    // Through NATS: a worker reads the bucket's slides.
    let nats = Nats::start();
    let store = s3_flags("remote-nats");
    let mut worker = spawn("w", d, &worker_flags(&nats, &store, "w"));
    let mut run = until_embed(&remote_manifest, &store);
    run.extend(nats_flags(&nats));
    ok(wsimil().args(&run), "distributed run from the bucket");
    assert_eq!(features(&s3.store("remote-nats")).await, disk, "the pool's features differ from disk's");
    worker.terminate(std::time::Duration::from_secs(30));

    // OpenSlide: each slide downloaded into the scratch folder, read, and the folder gone at exit.
    let scratch = d.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("mine.txt"), b"not wsimil's").unwrap();
    let openslide = |args: Vec<String>| {
        let mut c = wsimil();
        c.env("WSIMIL_READER", "openslide").args(args);
        c
    };
    ok(&mut openslide(until_embed(manifest.to_str().unwrap(), &local_store("disk-openslide"))), "openslide from disk");
    let mut args = until_embed(&remote_manifest, &local_store("remote-openslide"));
    args.extend(s(&["--s3-endpoint", &s3.endpoint(), "--s3-path-style", "--scratch"]));
    args.extend([scratch.display().to_string(), "--scratch-max-gb".into(), "1".into()]);
    ok(&mut openslide(args), "openslide from the bucket");
    let local_os =
        features(&Store::open(d.join("disk-openslide").to_str().unwrap(), &Default::default()).unwrap()).await;
    let remote_os =
        features(&Store::open(d.join("remote-openslide").to_str().unwrap(), &Default::default()).unwrap()).await;
    assert_eq!(local_os.len(), 3);
    assert_eq!(remote_os, local_os, "OpenSlide on the scratch copies differs from OpenSlide on disk");
    let remote_store = Store::open(d.join("remote-openslide").to_str().unwrap(), &Default::default()).unwrap();
    for (path, reader) in sources(&remote_store).await {
        assert!(
            path.starts_with("s3://") && reader.contains("openslide") && reader.contains("scratch"),
            "{path}: {reader}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("mine.txt")], "the scratch copies outlived the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_refused_objects_are_listed_up_front_and_broken_ones_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 2, 1024, 1280, false);
    let s3 = s3();
    let slides: Vec<(String, String)> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_string(), f[2].to_string())
        })
        .collect();
    let ours = s3.store("broken-objects");
    let good = std::fs::read(&slides[0].0).unwrap();
    ours.put(&Key::from("good.svs"), good.clone()).await.unwrap();
    // Another bucket, which the limited identity may not read.
    s3.open("s3://wsimil-private/x").put(&Key::from("secret.svs"), good.clone()).await.unwrap();
    let url = |k: &str| format!("{}/{k}", s3.location("broken-objects"));
    let limited = |args: &[String]| {
        let mut c = wsimil();
        c.env("AWS_ACCESS_KEY_ID", S3_LIMITED_KEY).env("AWS_SECRET_ACCESS_KEY", S3_LIMITED_SECRET).args(args);
        c
    };
    let store = s3.flags("broken-run");

    // Missing and refused: the run is refused before any work, every problem with its line.
    let csv = d.join("bad.csv");
    std::fs::write(
        &csv,
        format!(
            "slide_id,path,label\ngood,{},{}\ngone,{},tumor\nsecret,s3://wsimil-private/x/secret.svs,normal\n",
            url("good.svs"),
            slides[0].1,
            url("gone.svs")
        ),
    )
    .unwrap();
    let out = limited(&until_embed(csv.to_str().unwrap(), &store)).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("2 problems in the manifest"), "{err}");
    assert!(err.contains(&format!("line 3: gone: slide object not found: {}", url("gone.svs"))), "{err}");
    assert!(err.contains("line 4: secret: access to s3://wsimil-private/x/secret.svs refused"), "{err}");
    assert!(!err.contains(S3_LIMITED_SECRET), "credentials in a message: {err}");
    assert!(
        s3.store("broken-run").list(&Key::from("")).await.unwrap().is_empty(),
        "nothing written before the refusal"
    );

    // Truncated in the bucket, and corrupt: each fails its own job, named by URL; the good one is
    // embedded.
    ours.put(&Key::from("cut.svs"), good[..good.len() / 2].to_vec()).await.unwrap();
    ours.put(&Key::from("corrupt.svs"), std::fs::read(data("unreadable.svs")).unwrap()).await.unwrap();
    std::fs::write(
        &csv,
        format!(
            "slide_id,path,label\ngood,{},{}\ncut,{},tumor\ncorrupt,{},normal\nother,{},{}\n",
            url("good.svs"),
            slides[0].1,
            url("cut.svs"),
            url("corrupt.svs"),
            slides[1].0,
            slides[1].1
        ),
    )
    .unwrap();
    let out = ok(&mut limited(&until_embed(csv.to_str().unwrap(), &store)), "run with broken objects");
    let failure = |key: &str| {
        let u = url(key);
        out.lines().find(|l| l.contains("failed tile") && l.contains(&u)).map(str::to_string)
    };
    let cut = failure("cut.svs").unwrap_or_else(|| panic!("no failure naming the truncated object:\n{out}"));
    assert!(cut.contains("truncated"), "{cut}");
    assert!(failure("corrupt.svs").is_some(), "no failure naming the corrupt object:\n{out}");
    let bags = features(&s3.store("broken-run")).await;
    let done: Vec<&str> = bags.iter().map(|b| b.0.as_str()).collect();
    assert_eq!(done, vec!["good", "other"], "the cohort goes on past its broken slides");
}

/// In this process: a slide in the bucket is read by ranges, only the bytes its patches need, and
/// reads the same pixels as from disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slide_in_a_bucket_is_read_by_ranges_not_downloaded() {
    use wsimil_worker::slide::remote::{Scratch, SlideSources};
    let dir = tempfile::tempdir().unwrap();
    // A slide of 6144² (real tissue, repeated): large enough that the header is a small part.
    let src = wsimil_worker::slide::open(&data("cmu_small_region.svs")).unwrap();
    let tissue = wsimil_worker::synth::read_level0(src.as_ref()).unwrap();
    let big = image::RgbImage::from_fn(6144, 6144, |x, y| *tissue.get_pixel(x % 2048, y % 2048));
    let bytes = wsimil_worker::tiff::write_slide(&big, "big", &Default::default()).unwrap();
    let path = dir.path().join("big.svs").display().to_string();
    std::fs::write(&path, &bytes).unwrap();
    let s3 = s3();
    s3.store("ranged").put(&Key::from("a.svs"), bytes.clone()).await.unwrap();
    let url = format!("{}/a.svs", s3.location("ranged"));
    let sources = SlideSources::new(s3.options(), Scratch::new(dir.path().join("scratch"), 1 << 30));
    tokio::task::spawn_blocking(move || {
        let remote = sources.open(&url).unwrap();
        let local = wsimil_worker::slide::open(Path::new(&path)).unwrap();
        assert!(remote.reader_name().contains("native"), "{}", remote.reader_name());
        assert_eq!(remote.path(), Path::new(&url));
        assert_eq!(remote.level_count(), local.level_count());
        let opened = remote.bytes_read();
        let ahead = wsimil_worker::slide::source::READ_AHEAD;
        // The header and each level's directory and offset tables: a few read-aheads.
        assert!(
            opened <= 6 * ahead && opened < bytes.len() as u64 / 4,
            "opening fetched {opened} of {} bytes",
            bytes.len()
        );
        let regions: Vec<_> = (0..4).map(|i| (i * 256, 512, 0usize, 256u32, 256u32)).collect();
        remote.prefetch(&regions).unwrap();
        for &(x, y, l, w, h) in &regions {
            assert_eq!(remote.read_region(x, y, l, w, h).unwrap(), local.read_region(x, y, l, w, h).unwrap());
        }
        let read = remote.bytes_read() - opened;
        eprintln!("{} bytes: {opened} to open, {read} for 4 patches", bytes.len());
        assert!(read < bytes.len() as u64 / 8, "{read} of {} bytes fetched for 4 patches", bytes.len());
        assert!(sources.scratch().bytes() == 0, "nothing downloaded to scratch");
    })
    .await
    .unwrap();
}

/// A tile job for `path` on a coarse grid (2 µm/px: a few patches, quick).
fn coarse_tile_job(slide: &str, path: String) -> wsimil_common::job::Job {
    use wsimil_common::grid::{TissueParams, TissuePreset};
    use wsimil_common::job::{Job, TileJob};
    let tiling = wsimil_common::plan::TilingSpec {
        patch_px: 256,
        target_mpp: 2.0,
        step_fraction: 1.0,
        min_tissue_fraction: 0.5,
        tissue: TissueParams::preset(TissuePreset::Biopsy),
    };
    Job::Tile(TileJob { slide: wsimil_common::ids::SlideId::new(slide).unwrap(), path, mpp: None, tiling })
}

/// An object that goes after the manifest was checked (deleted while the cohort runs) fails its own
/// job with the object's URL, and as a permanent failure: it is not retried as if the server had
/// had a hiccup, and a good slide's job beside it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_gone_after_the_check_fails_its_own_job_for_good() {
    use wsimil_worker::jobs::{execute, WorkerContext};
    use wsimil_worker::slide::remote::{Scratch, SlideSources};
    let dir = tempfile::tempdir().unwrap();
    let s3 = s3();
    let bucket = s3.store("gone-objects");
    let svs = std::fs::read(data("cmu_small_region.svs")).unwrap();
    bucket.put(&Key::from("good.svs"), svs.clone()).await.unwrap();
    bucket.put(&Key::from("gone.svs"), svs.clone()).await.unwrap();
    let url = |k: &str| format!("{}/{k}", s3.location("gone-objects"));
    let sources = SlideSources::new(s3.options(), Scratch::new(dir.path().join("scratch"), 1 << 30));
    // The manifest's check (a HEAD of every object) finds both, whole; then one goes.
    let sizes = sources.buckets().head_all(&[url("good.svs"), url("gone.svs")]).await;
    assert!(sizes.iter().all(|s| s.as_ref().is_ok_and(|n| *n == svs.len() as u64)), "{sizes:?}");
    bucket.delete(&Key::from("gone.svs")).await.unwrap();
    assert!(!bucket.exists(&Key::from("gone.svs")).await.unwrap());
    let ctx =
        WorkerContext::new(s3.store("gone-run"), wsimil_worker::device::Compute::cpu(), "t").with_sources(sources);
    let tile = |slide: &str, key: &str| coarse_tile_job(slide, url(key));
    let err = execute(&ctx, &tile("gone", "gone.svs")).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&url("gone.svs")) && msg.contains("not found"), "{msg}");
    assert!(!err.is_transient(), "a missing object is not retried: {msg}");
    execute(&ctx, &tile("good", "good.svs")).await.unwrap();
}

/// Truth files in a bucket are read and checked with the manifest, before any work, as local ones
/// are: a missing one and one that is neither a mask nor an annotation are named with their lines;
/// an empty annotation (QuPath's export of a slide without lesions) is a lesion-free slide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truth_files_in_a_bucket_are_checked_before_any_work() {
    use wsimil_coordinator::manifest::{self, ManifestError};
    use wsimil_worker::slide::remote::Buckets;
    let s3 = s3();
    let bucket = s3.store("truth-objects");
    for k in ["a.svs", "b.svs", "c.svs", "d.svs"] {
        bucket.put(&Key::from(k), b"a slide".to_vec()).await.unwrap();
    }
    bucket
        .put(&Key::from("a.geojson"), br#"{"type": "Polygon", "coordinates": [[[0,0],[9,0],[0,9],[0,0]]]}"#.to_vec())
        .await
        .unwrap();
    bucket.put(&Key::from("b.geojson"), br#"{"type": "FeatureCollection", "features": []}"#.to_vec()).await.unwrap();
    bucket.put(&Key::from("c.png"), b"not a picture".to_vec()).await.unwrap();
    let at = s3.location("truth-objects");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("m.csv");
    let write = |rows: &str| std::fs::write(&csv, format!("slide_id,path,label,truth\n{rows}")).unwrap();
    let buckets = Buckets::new(s3.options());
    write(&format!(
        "a,{at}/a.svs,tumor,{at}/a.geojson\nb,{at}/b.svs,normal,{at}/b.geojson\nc,{at}/c.svs,tumor,{at}/c.png\n\
         d,{at}/d.svs,normal,{at}/gone.geojson\n"
    ));
    let err = manifest::load(&csv, None, &buckets).await.unwrap_err();
    let ManifestError::Invalid { problems, .. } = &err else { panic!("{err}") };
    let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(text.len(), 2, "{text:#?}");
    assert!(text[0].starts_with(&format!("line 4: c: truth {at}/c.png: not a mask image")), "{text:#?}");
    assert!(text[1].starts_with(&format!("line 5: d: cannot read its truth {at}/gone.geojson")), "{text:#?}");
    assert!(text[1].contains("not found"), "{text:#?}");
    write(&format!("a,{at}/a.svs,tumor,{at}/a.geojson\nb,{at}/b.svs,normal,{at}/b.geojson\n"));
    let m = manifest::load(&csv, None, &buckets).await.unwrap();
    assert_eq!(m.rows[1].truth.as_deref(), Some(Path::new(&format!("{at}/b.geojson"))));
}

/// The S3 server goes away part way through a ranged read of a slide (a proxy in front of it
/// closes every connection mid-response and refuses new ones): the job fails with the slide's URL
/// as a store that is unavailable, the retry policy decides to try it again, and once the server
/// is back the same job tiles the slide as a run that never saw the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_read_fails_the_job_for_a_retry_that_then_succeeds() {
    use wsimil_worker::error::{Decision, RetryPolicy};
    use wsimil_worker::jobs::{execute, WorkerContext};
    use wsimil_worker::slide::remote::{Scratch, SlideSources};
    let dir = tempfile::tempdir().unwrap();
    let s3 = s3();
    let bucket = s3.store("cut-objects");
    let svs = std::fs::read(data("cmu_small_region.svs")).unwrap();
    bucket.put(&Key::from("a.svs"), svs.clone()).await.unwrap();
    let url = format!("{}/a.svs", s3.location("cut-objects"));
    let job = coarse_tile_job("a", url.clone());
    // Slides read through `endpoint`, no retries inside the S3 client (the job's policy decides);
    // features written straight to the server under `run`.
    let ctx = |endpoint: String, run: &str| {
        let mut options = s3.options();
        options.endpoint = Some(endpoint);
        options.max_retries = Some(0);
        let sources = SlideSources::new(options, Scratch::new(dir.path().join(run), 1 << 30));
        WorkerContext::new(s3.store(run), wsimil_worker::device::Compute::cpu(), "t").with_sources(sources)
    };
    let tiles = |run: &str| {
        let store = s3.store(run);
        async move { store.list(&Key::from("")).await.unwrap().len() }
    };
    // What a run that never saw the failure writes.
    execute(&ctx(s3.endpoint(), "cut-direct"), &job).await.unwrap();
    let want = tiles("cut-direct").await;
    assert!(want > 0);

    // 200 kB into the responses: past the HEAD and the first ranged GET of the header (64 KiB),
    // inside the reads of the slide's tiles.
    let proxy = Proxy::start(s3.port, Some(200_000));
    let err = execute(&ctx(proxy.endpoint(), "cut-run"), &job).await.unwrap_err();
    let (cut, passed) = proxy.cut();
    assert!(cut && passed >= 200_000, "the proxy cut a response: {passed} bytes passed");
    let msg = err.to_string();
    assert!(msg.contains(&url) && msg.contains("unavailable"), "{msg}");
    assert!(err.is_transient(), "{msg}");
    let policy = RetryPolicy::default();
    assert_eq!(policy.decide(&err, 1), Decision::RetryAfter(policy.backoff), "{msg}");

    // The server is back (on the same address): the retried job succeeds, with what the run that
    // never failed wrote.
    let port = proxy.port;
    drop(proxy);
    let back = Proxy::start_on(port, s3.port, None);
    execute(&ctx(back.endpoint(), "cut-run"), &job).await.unwrap();
    assert_eq!(tiles("cut-run").await, want);
    let (a, b) = (s3.store("cut-direct"), s3.store("cut-run"));
    for key in a.list(&Key::from("")).await.unwrap() {
        assert_eq!(a.get(&key).await.unwrap(), b.get(&key).await.unwrap(), "{key}");
    }
}
