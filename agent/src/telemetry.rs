//! The direct path's telemetry: connections the proxy would have added
//! nothing to go straight to their destination (see `ebpf/programs`), and the
//! kernel accounts them. This thread turns what it accounted into what the
//! proxy would have emitted: one access line per connection (from the ring
//! buffer's records) and the proxy's connection series (from the per-pod
//! totals, which lose nothing), each labelled `path="direct"`.

mod names;
mod records;
mod series;

pub use names::{PodName, PodNames};
pub use series::{DirectSeries, sum};

use std::os::fd::AsFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, PerCpuHashMap, RingBuf};
use podsteer_common::{PodTraffic, map_names as names_of};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("opening the pinned map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("starting the telemetry thread")]
    Thread(#[source] std::io::Error),
}

/// How often the per-pod totals are read into the series: what a scrape may lag.
pub const TOTALS_EVERY: Duration = Duration::from_secs(1);

fn pinned(pins: &crate::ebpf::pins::PinDir, name: &'static str) -> Result<Map, TelemetryError> {
    let err = |e| TelemetryError::Map { name, source: Box::new(e) };
    Map::from_map_data(MapData::from_pin(pins.map(name)).map_err(err)?).map_err(err)
}

/// Starts the thread. It reads the maps from their pins, so it shares no
/// handle with the controller, which only creates and removes a pod's totals.
pub fn start(bpffs: &Path, pod_names: PodNames) -> Result<(), TelemetryError> {
    let pins = crate::ebpf::pins::PinDir::new(bpffs);
    let err = |name| move |e| TelemetryError::Map { name, source: Box::new(e) };
    let ring: RingBuf<MapData> = pinned(&pins, names_of::CONN_EVENTS)?.try_into().map_err(err(names_of::CONN_EVENTS))?;
    let totals: PerCpuHashMap<MapData, u64, PodTraffic> =
        pinned(&pins, names_of::DIRECT_TRAFFIC)?.try_into().map_err(err(names_of::DIRECT_TRAFFIC))?;
    std::thread::Builder::new().name("telemetry".into()).spawn(move || run(ring, totals, pod_names)).map_err(TelemetryError::Thread)?;
    Ok(())
}

fn run(mut ring: RingBuf<MapData>, totals: PerCpuHashMap<MapData, u64, PodTraffic>, pod_names: PodNames) {
    let series = crate::metrics::metrics().direct.clone();
    let mut read = series::TotalsReader::default();
    let mut last_totals = Instant::now() - TOTALS_EVERY;
    loop {
        // Woken by the kernel as records come; at least once a second for the totals.
        let timeout = TOTALS_EVERY.saturating_sub(last_totals.elapsed());
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [nix::poll::PollFd::new(ring.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "polling the direct-connection records; telemetry stops");
                return;
            }
        }
        while let Some(item) = ring.next() {
            match records::decode(&item) {
                Some(r) => records::log(&r, &pod_names),
                None => tracing::warn!(len = item.len(), "a direct-connection record of the wrong size"),
            }
        }
        if last_totals.elapsed() >= TOTALS_EVERY {
            last_totals = Instant::now();
            read.update(&totals, &pod_names, &series);
        }
    }
}
