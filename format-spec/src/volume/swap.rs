//! Linux swap areas: only the header page holds anything that outlives a reboot; the pages
//! after it are unused. A swap area holding a hibernation image carries another signature
//! (`S1SUSPEND`, ...) and is not recognized here, so it is kept whole.

use super::{FreeRanges, Scan, Window};

/// The page sizes a swap header may be written for; its signature ends the first page.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

pub(crate) fn scan(w: &Window<'_>) -> Option<Scan> {
    let page = PAGE_SIZES.into_iter().find(|&p| w.has(p - 10, b"SWAPSPACE2"))?;
    Some(Scan { file_system: "swap", free: free(w, page) })
}

fn free(w: &Window<'_>, page: u64) -> Result<FreeRanges, String> {
    let header = w.read(1024, 12)?;
    let version = u32::from_le_bytes(header[0..4].try_into().unwrap());
    if version != 1 {
        return Err(format!("swap header version {version} (strata reads version 1)"));
    }
    let last_page = u64::from(u32::from_le_bytes(header[4..8].try_into().unwrap()));
    let end = (last_page + 1).saturating_mul(page).min(w.len());
    let mut free = FreeRanges::default();
    free.push(page, end)?;
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swap_area(pages: u32, page: usize) -> Vec<u8> {
        let mut d = vec![0xAAu8; pages as usize * page];
        d[..page].fill(0);
        d[1024..1028].copy_from_slice(&1u32.to_le_bytes());
        d[1028..1032].copy_from_slice(&(pages - 1).to_le_bytes());
        d[page - 10..page].copy_from_slice(b"SWAPSPACE2");
        d
    }

    #[test]
    fn a_swap_area_keeps_its_header_page_only() {
        let d = swap_area(16, 4096);
        let scan = scan(&Window { disk: &d, start: 0, len: d.len() as u64 }).unwrap();
        assert_eq!(scan.free.unwrap().ranges(), &[(4096, 16 * 4096)]);
    }

    #[test]
    fn a_swap_area_smaller_than_its_region_keeps_what_follows_it() {
        let mut d = swap_area(16, 4096);
        d.extend(vec![0x55u8; 8192]);
        let scan = scan(&Window { disk: &d, start: 0, len: d.len() as u64 }).unwrap();
        assert_eq!(scan.free.unwrap().ranges(), &[(4096, 16 * 4096)]);
    }

    #[test]
    fn a_hibernation_image_in_a_swap_area_is_not_recognized() {
        let mut d = swap_area(16, 4096);
        d[4096 - 10..4096].copy_from_slice(b"S1SUSPEND\0");
        assert!(scan(&Window { disk: &d, start: 0, len: d.len() as u64 }).is_none());
    }
}
