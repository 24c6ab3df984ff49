// A program outside the coproc tree, built against an installed coproc (via
// pkg-config) or against coproc as a Meson subproject, by scripts/check_packaging.
#include <coproc/coproc.hpp>

#include <chrono>
#include <cstdio>

namespace {
coproc::task<int> nap(coproc::event_loop* loop) {
    co_await loop->sleep_for(std::chrono::milliseconds{1});
    co_return 0;
}
} // namespace

int main() {
    coproc::event_loop loop;
    const int status = loop.run(nap(&loop));
    std::puts("consumer: coproc works");
    return status;
}
