// The main of every test program. It is also the workers' main: a test
// program that submits to a process_pool re-executes itself in worker mode.
//
// A listener checks every test case for leaks: when a test case ends, no
// child process may exist (running or zombie) and the number of open file
// descriptors must be what it was when the test case started (fewer only
// where a case allows it: test_support::fewer_descriptors_allowed). A leak is
// reported with the test's name and makes the program exit non-zero.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <coproc/worker.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <dirent.h>
#include <string_view>
#include <unistd.h>
#include <string>
#include <utility>
#include <sys/wait.h>

namespace test_support {
// Set by a test program (at static initialization) to run once before its
// first case, outside every case's leak check.
void (*before_tests)() = nullptr;
bool fewer_descriptors_allowed = false;
} // namespace test_support

namespace {

bool leak_found = false;

int open_descriptors() {
    int count = 0;
    DIR* dir = ::opendir("/proc/self/fd");
    if (dir == nullptr) return -1;
    while (::dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] != '.') ++count;
    }
    ::closedir(dir);
    return count - 1; // the directory stream's own descriptor
}

class leak_listener final : public doctest::IReporter {
public:
    explicit leak_listener(const doctest::ContextOptions&) {}

    void test_case_start(const doctest::TestCaseData& test) override {
        name_ = test.m_name;
        fds_at_start_ = open_descriptors();
    }
    void test_case_end(const doctest::CurrentTestCaseStats&) override {
        const int fds = open_descriptors();
        const bool children = !(::waitpid(-1, nullptr, WNOHANG) == -1 && errno == ECHILD);
        const bool fewer_allowed = std::exchange(test_support::fewer_descriptors_allowed, false);
        if (fds > fds_at_start_ || (fds < fds_at_start_ && !fewer_allowed) || children) {
            leak_found = true;
            std::fprintf(stderr, "LEAK after test case '%s': %d open descriptors (%d at its start)%s\n", name_.c_str(), fds,
                         fds_at_start_, children ? ", and a child process is left" : "");
        }
    }

    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats&) override {}
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}

private:
    std::string name_;
    int fds_at_start_ = 0;
};

} // namespace

DOCTEST_REGISTER_LISTENER("leaks", 1, leak_listener);

int main(int argc, char** argv) {
    // A worker slow to start, for the tests that kill workers before they
    // say HELLO (test_pool_faults.cpp): set only in workers' environments.
    if (const char* delay = std::getenv("COPROC_TEST_WORKER_START_DELAY_MS")) {
        if (argc > 1 && std::string_view{argv[1]} == "--coproc-worker") ::usleep(static_cast<useconds_t>(std::atoi(delay)) * 1000);
    }
    coproc::run_worker_if_requested(argc, argv);
    if (test_support::before_tests != nullptr) test_support::before_tests();
    int status = doctest::Context(argc, argv).run();
    if (leak_found) {
        std::fprintf(stderr, "test program failed: a test case leaked processes or descriptors (see LEAK above)\n");
        if (status == 0) status = 3;
    }
    // For a launcher that does not pass the status on (tests/mpi_status.py).
    if (const char* path = std::getenv("COPROC_TEST_STATUS_FILE"); path != nullptr && *path != '\0') {
        if (std::FILE* file = std::fopen(path, "w")) {
            std::fprintf(file, "%d\n", status);
            std::fclose(file);
        }
    }
    return status;
}
