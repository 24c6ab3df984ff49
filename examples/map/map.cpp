// map: one function over many inputs. map collects every result in input
// order; map_stream yields them in order as they arrive. chunksize puts many
// inputs in one task (fewer round trips); buffersize bounds the chunks in
// flight (bounded memory for long inputs).
#include <coproc/coproc.hpp>

#include <cstdio>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

namespace {

// The Collatz stopping time of n: a small CPU-bound function.
int collatz_steps(long n) {
    int steps = 0;
    while (n != 1) {
        n = n % 2 == 0 ? n / 2 : 3 * n + 1;
        ++steps;
    }
    return steps;
}

std::string label(std::string name, int number) { return name + " #" + std::to_string(number); }

coproc::task<int> demonstrate(coproc::process_pool* pool) {
    std::vector<long> numbers(100'000);
    std::iota(numbers.begin(), numbers.end(), 1L);

    // Collect everything: 100 tasks of 1,000 inputs each.
    const std::vector<int> steps = co_await pool->map<collatz_steps>(numbers, {.chunksize = 1000});
    long longest = 0;
    for (std::size_t i = 0; i < steps.size(); ++i) {
        if (steps[i] > steps[static_cast<std::size_t>(longest)]) longest = static_cast<long>(i);
    }
    std::printf("below 100001, %ld takes the most steps: %d\n", numbers[static_cast<std::size_t>(longest)],
                steps[static_cast<std::size_t>(longest)]);

    // Stream results, at most 2 chunks of 2 in flight; tuple inputs become arguments.
    std::vector<std::tuple<std::string, int>> inputs{{"alpha", 1}, {"beta", 2}, {"gamma", 3}, {"delta", 4}, {"epsilon", 5}};
    auto labels = pool->map_stream<label>(inputs, {.chunksize = 2, .buffersize = 2});
    int streamed = 0;
    while (auto text = co_await labels.next()) {
        std::printf("streamed: %s\n", text->c_str());
        ++streamed;
    }
    co_return steps.size() == numbers.size() && streamed == 5 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
    coproc::run_worker_if_requested(argc, argv);
    coproc::event_loop loop;
    coproc::process_pool pool{loop, {.max_workers = 2}};
    return loop.run(demonstrate(&pool));
}
