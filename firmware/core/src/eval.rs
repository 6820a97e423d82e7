//! Accuracy of the detector against labelled photos (`deskcam eval`): per-class
//! precision and recall at IoU 0.5 and a score threshold, AP at IoU 0.5, and the
//! image-level accuracy of the rules. Pure: the caller runs the detector.
//!
//! The labels are those of `../shared/data/frames/labels.json`: boxes per photo, and
//! image-level facts (`person_count`, `has_phone`, `has_book`, ...). Where a photo's
//! `image_level.labels` says that phone and book are image-level only, its box metrics
//! for those classes skip the photo (it has no such boxes to match), and the rules use it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detection::BBox;

/// The classes the rules use, whose box metrics are reported.
pub const CLASSES: [&str; 3] = ["person", "cell phone", "book"];
/// A detection matches a labelled box at this IoU or more.
pub const IOU: f32 = 0.5;

/// One photo of `labels.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct LabelledImage {
    pub file: String,
    #[serde(default)]
    pub objects: Vec<LabelledObject>,
    pub image_level: ImageLevel,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LabelledObject {
    pub class: String,
    pub bbox_xywh: [f32; 4],
    #[serde(default)]
    pub iscrowd: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageLevel {
    #[serde(default)]
    pub person_count: u32,
    #[serde(default)]
    pub has_phone: bool,
    #[serde(default)]
    pub has_book: bool,
    #[serde(default)]
    pub has_person_crowd: bool,
    /// Every "person" is on a screen, in a photo or a statue: nobody is really there.
    #[serde(default)]
    pub depicted_persons_only: bool,
    /// Set where only some classes are boxed (see the module comment).
    pub labels: Option<String>,
}

impl LabelledImage {
    /// Whether the photo's boxes of `class` are complete, so box metrics may use it.
    pub fn boxes_complete(&self, class: &str) -> bool {
        class == "person" || self.image_level.labels.is_none()
    }

    /// Really present people (depicted ones do not count; a crowd counts as many).
    pub fn people(&self) -> u32 {
        if self.image_level.depicted_persons_only {
            0
        } else if self.image_level.has_person_crowd {
            self.image_level.person_count.max(2)
        } else {
            self.image_level.person_count
        }
    }
}

/// Parses `labels.json`.
pub fn parse_labels(text: &str) -> Result<Vec<LabelledImage>, serde_json::Error> {
    serde_json::from_str(text)
}

/// A detection as the evaluation needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub class: String,
    pub score: f32,
    pub bbox: BBox,
}

#[derive(Clone, Debug, Default)]
struct ClassAcc {
    /// Every detection of the class on a photo whose boxes are complete: score and
    /// whether it matched a labelled box.
    ranked: Vec<(f32, bool)>,
    labelled: usize,
}

/// Confusion counts of one image-level rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: u32,
    pub fp: u32,
    pub fn_: u32,
    pub tn: u32,
}

impl Confusion {
    fn add(&mut self, predicted: bool, truth: bool) {
        match (predicted, truth) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, true) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    pub fn precision(&self) -> f32 {
        ratio(self.tp, self.tp + self.fp)
    }

    pub fn recall(&self) -> f32 {
        ratio(self.tp, self.tp + self.fn_)
    }
}

fn ratio(a: u32, b: u32) -> f32 {
    if b == 0 {
        0.0
    } else {
        a as f32 / b as f32
    }
}

/// Score thresholds at which precision, recall and the rules are judged.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    pub person: f32,
    pub phone: f32,
    pub book: f32,
    /// `rules.extra_person.min_score`
    pub extra_person: f32,
    /// `rules.absent.min_score`
    pub absent: f32,
}

impl Thresholds {
    fn of(&self, class: &str) -> f32 {
        match class {
            "cell phone" => self.phone,
            "book" => self.book,
            _ => self.person,
        }
    }
}

/// Collects photo by photo; [`Evaluation::report`] gives the figures.
#[derive(Clone, Debug)]
pub struct Evaluation {
    thresholds: Thresholds,
    classes: BTreeMap<&'static str, ClassAcc>,
    /// Precision and recall at the thresholds, counted per class.
    at_threshold: BTreeMap<&'static str, Confusion>,
    rules: BTreeMap<&'static str, Confusion>,
    images: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassReport {
    pub precision: f32,
    pub recall: f32,
    pub ap50: f32,
    /// Labelled boxes the figures are over.
    pub boxes: usize,
    pub threshold: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleReport {
    pub precision: f32,
    pub recall: f32,
    pub tp: u32,
    pub fp: u32,
    #[serde(rename = "fn")]
    pub fn_: u32,
    pub tn: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub images: usize,
    pub classes: BTreeMap<String, ClassReport>,
    /// Mean of the three classes' AP at IoU 0.5.
    pub map50: f32,
    pub rules: BTreeMap<String, RuleReport>,
}

impl Evaluation {
    pub fn new(thresholds: Thresholds) -> Self {
        Evaluation {
            thresholds,
            classes: CLASSES.iter().map(|c| (*c, ClassAcc::default())).collect(),
            at_threshold: CLASSES.iter().map(|c| (*c, Confusion::default())).collect(),
            rules: ["phone", "extra_person", "absent"].iter().map(|r| (*r, Confusion::default())).collect(),
            images: 0,
        }
    }

    /// Adds one photo: its labels and everything the detector found (any score; the
    /// lower the detector's own cut-off, the more of the precision-recall curve AP sees).
    pub fn add(&mut self, image: &LabelledImage, found: &[Scored]) {
        self.images += 1;
        for class in CLASSES {
            if !image.boxes_complete(class) {
                continue;
            }
            let (crowd, gt): (Vec<_>, Vec<_>) =
                image.objects.iter().filter(|o| o.class == class).partition(|o| o.iscrowd);
            let boxes = |objects: Vec<&LabelledObject>| -> Vec<BBox> {
                objects.iter().map(|o| o.bbox_xywh).map(|[x, y, w, h]| BBox::from_xywh(x, y, w, h)).collect()
            };
            let (gt, crowd) = (boxes(gt), boxes(crowd));
            let mut dets: Vec<&Scored> = found.iter().filter(|d| d.class == class).collect();
            dets.sort_by(|a, b| b.score.total_cmp(&a.score));
            let matched = match_greedy(&dets, &gt, &crowd);
            let acc = self.classes.entry(class).or_default();
            acc.labelled += gt.len();
            let thr = self.thresholds.of(class);
            let at = self.at_threshold.entry(class).or_default();
            let mut hits = 0;
            for (d, m) in dets.iter().zip(&matched) {
                let Some(tp) = m else { continue }; // on a crowd region: ignored
                acc.ranked.push((d.score, *tp));
                if d.score >= thr {
                    if *tp {
                        at.tp += 1;
                        hits += 1;
                    } else {
                        at.fp += 1;
                    }
                }
            }
            at.fn_ += (gt.len() - hits) as u32;
        }
        let count =
            |class: &str, thr: f32| found.iter().filter(|d| d.class == class && d.score >= thr).count();
        let t = &self.thresholds;
        let (phone, extra, absent) = (
            count("cell phone", t.phone) > 0,
            count("person", t.extra_person) >= 2,
            count("person", t.absent) == 0,
        );
        let people = image.people();
        self.rules.entry("phone").or_default().add(phone, image.image_level.has_phone);
        self.rules.entry("extra_person").or_default().add(extra, people >= 2);
        self.rules.entry("absent").or_default().add(absent, people == 0);
    }

    pub fn report(&self) -> Report {
        let mut classes = BTreeMap::new();
        let mut aps = Vec::new();
        for class in CLASSES {
            let acc = &self.classes[class];
            let at = self.at_threshold[class];
            let ap50 = average_precision(&acc.ranked, acc.labelled);
            aps.push(ap50);
            classes.insert(
                class.to_string(),
                ClassReport {
                    precision: at.precision(),
                    recall: at.recall(),
                    ap50,
                    boxes: acc.labelled,
                    threshold: self.thresholds.of(class),
                },
            );
        }
        let rules = self
            .rules
            .iter()
            .map(|(name, c)| {
                let r = RuleReport {
                    precision: c.precision(),
                    recall: c.recall(),
                    tp: c.tp,
                    fp: c.fp,
                    fn_: c.fn_,
                    tn: c.tn,
                };
                (name.to_string(), r)
            })
            .collect();
        Report { images: self.images, classes, map50: aps.iter().sum::<f32>() / aps.len() as f32, rules }
    }
}

/// Greedy matching in score order (as COCO does): each detection takes the unmatched
/// labelled box it overlaps most at IoU ≥ 0.5. `Some(true)`: a hit; `Some(false)`: a
/// false positive; `None`: unmatched but inside a crowd region (neither).
fn match_greedy(dets: &[&Scored], gt: &[BBox], crowd: &[BBox]) -> Vec<Option<bool>> {
    let mut taken = vec![false; gt.len()];
    dets.iter()
        .map(|d| {
            let best = gt
                .iter()
                .enumerate()
                .filter(|(i, _)| !taken[*i])
                .map(|(i, g)| (i, d.bbox.iou(g)))
                .filter(|(_, iou)| *iou >= IOU)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((i, _)) => {
                    taken[i] = true;
                    Some(true)
                }
                None if crowd.iter().any(|c| covered_by(&d.bbox, c) >= IOU) => None,
                None => Some(false),
            }
        })
        .collect()
}

/// The part of `a` inside `b`.
fn covered_by(a: &BBox, b: &BBox) -> f32 {
    let area = a.area();
    if area <= 0.0 {
        0.0
    } else {
        a.intersection(b) / area
    }
}

/// Area under the precision-recall curve with precision made monotone (all-point
/// interpolation, as PASCAL VOC since 2010): detections ranked by score over all photos.
pub fn average_precision(ranked: &[(f32, bool)], labelled: usize) -> f32 {
    if labelled == 0 {
        return 0.0;
    }
    let mut sorted = ranked.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut points = Vec::with_capacity(sorted.len());
    for (_, hit) in &sorted {
        if *hit {
            tp += 1;
        } else {
            fp += 1;
        }
        points.push((tp as f32 / labelled as f32, tp as f32 / (tp + fp) as f32));
    }
    // Monotone precision from the right, then the area by recall steps.
    for i in (0..points.len().saturating_sub(1)).rev() {
        points[i].1 = points[i].1.max(points[i + 1].1);
    }
    let mut ap = 0.0;
    let mut last_recall = 0.0;
    for (recall, precision) in points {
        ap += (recall - last_recall) * precision;
        last_recall = recall;
    }
    ap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(objects: &[(&str, [f32; 4])], level: ImageLevel) -> LabelledImage {
        LabelledImage {
            file: "x.jpg".into(),
            objects: objects
                .iter()
                .map(|(c, b)| LabelledObject { class: c.to_string(), bbox_xywh: *b, iscrowd: false })
                .collect(),
            image_level: level,
        }
    }

    fn det(class: &str, score: f32, xywh: [f32; 4]) -> Scored {
        Scored { class: class.into(), score, bbox: BBox::from_xywh(xywh[0], xywh[1], xywh[2], xywh[3]) }
    }

    fn thresholds() -> Thresholds {
        Thresholds { person: 0.4, phone: 0.3, book: 0.25, extra_person: 0.4, absent: 0.35 }
    }

    #[test]
    fn average_precision_of_known_rankings() {
        assert_eq!(average_precision(&[(0.9, true), (0.8, true)], 2), 1.0);
        assert_eq!(average_precision(&[], 3), 0.0);
        // hit, miss, hit over 2 boxes: recall 0.5 at precision 1, then 1.0 at 2/3.
        let ap = average_precision(&[(0.9, true), (0.8, false), (0.7, true)], 2);
        assert!((ap - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-6, "{ap}");
        // One of two boxes never found: AP at most 0.5.
        assert_eq!(average_precision(&[(0.9, true)], 2), 0.5);
    }

    #[test]
    fn boxes_match_once_at_iou_half_and_thresholds_cut() {
        let mut e = Evaluation::new(thresholds());
        let img = image(
            &[("person", [0.0, 0.0, 100.0, 100.0]), ("person", [200.0, 0.0, 100.0, 100.0])],
            ImageLevel { person_count: 2, ..Default::default() },
        );
        let found = [
            det("person", 0.9, [2.0, 2.0, 100.0, 100.0]),     // hit
            det("person", 0.8, [0.0, 0.0, 100.0, 100.0]),     // the same box again: FP
            det("person", 0.3, [200.0, 0.0, 100.0, 100.0]),   // hit, below the threshold
            det("cell phone", 0.5, [50.0, 50.0, 10.0, 10.0]), // no phone there
        ];
        e.add(&img, &found);
        let r = e.report();
        let p = &r.classes["person"];
        assert_eq!((p.precision, p.recall, p.boxes), (0.5, 0.5, 2));
        assert!((p.ap50 - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-6);
        assert_eq!(r.classes["cell phone"].precision, 0.0);
        assert_eq!(r.rules["phone"].fp, 1);
        assert_eq!(r.rules["extra_person"].tp, 1);
        assert_eq!(r.rules["absent"].tn, 1);
    }

    #[test]
    fn image_level_only_photos_skip_phone_boxes_but_count_for_rules() {
        let mut e = Evaluation::new(thresholds());
        let img = image(
            &[],
            ImageLevel {
                person_count: 0,
                has_phone: true,
                labels: Some("persons boxed; phone and book image-level only".into()),
                ..Default::default()
            },
        );
        e.add(&img, &[det("cell phone", 0.6, [0.0, 0.0, 20.0, 40.0])]);
        let r = e.report();
        assert_eq!(r.classes["cell phone"].boxes, 0);
        assert_eq!(r.classes["cell phone"].precision, 0.0, "nothing counted");
        assert_eq!((r.rules["phone"].tp, r.rules["absent"].tp), (1, 1));
        // Depicted people are nobody: "absent" is the truth.
        let depicted = image(
            &[("person", [0.0, 0.0, 50.0, 50.0])],
            ImageLevel { person_count: 1, depicted_persons_only: true, ..Default::default() },
        );
        assert_eq!(depicted.people(), 0);
    }

    #[test]
    fn parses_the_shared_label_format() {
        let text = r#"[{"file": "a.jpg", "licence": "CC BY 2.0", "width": 640, "height": 480,
            "objects": [{"class": "person", "bbox_xywh": [1, 2, 3, 4], "iscrowd": false}],
            "image_level": {"person_count": 1, "has_phone": false, "has_book": true, "has_laptop": false}}]"#;
        let l = parse_labels(text).unwrap();
        assert_eq!(l[0].objects[0].bbox_xywh, [1.0, 2.0, 3.0, 4.0]);
        assert!(l[0].image_level.has_book && l[0].boxes_complete("book"));
        assert!(parse_labels("{").is_err());
    }
}
